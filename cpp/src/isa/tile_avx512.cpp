// The avx512 variant of the tile kernels (see tile_impl.h); CMake gives this file its own instruction-set flags.
#define KA_ISA 2
#define KA_NS isa_avx512
#define KA_ISA_NAME "avx512"
#define KA_TABLE_FN tile_kernels_avx512
#include "isa/tile_impl.h"
