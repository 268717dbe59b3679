// The avx512 variant of the per-layer statistics kernels (see quality_impl.h); CMake gives this file its own
// instruction-set flags.
#define KA_ISA 2
#define KA_NS quality_avx512
#define KA_ISA_NAME "avx512"
#define KA_TABLE_FN quality_kernels_avx512
#include "isa/quality_impl.h"
