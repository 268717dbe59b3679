// The avx2 variant of the tile kernels (see tile_impl.h); CMake gives this file its own instruction-set flags.
#define KA_ISA 1
#define KA_NS isa_avx2
#define KA_ISA_NAME "avx2"
#define KA_TABLE_FN tile_kernels_avx2
#include "isa/tile_impl.h"
