// The avx2 variant of the per-layer statistics kernels (see quality_impl.h); CMake gives this file its own
// instruction-set flags.
#define KA_ISA 1
#define KA_NS quality_avx2
#define KA_ISA_NAME "avx2"
#define KA_TABLE_FN quality_kernels_avx2
#include "isa/quality_impl.h"
