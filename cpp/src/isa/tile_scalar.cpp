// The scalar variant of the tile kernels (see tile_impl.h); CMake gives this file its own instruction-set flags.
#define KA_ISA 0
#define KA_NS isa_scalar
#define KA_ISA_NAME "scalar"
#define KA_TABLE_FN tile_kernels_scalar
#include "isa/tile_impl.h"
