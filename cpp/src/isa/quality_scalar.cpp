// The scalar variant of the per-layer statistics kernels (see quality_impl.h); CMake gives this file its own
// instruction-set flags.
#define KA_ISA 0
#define KA_NS quality_scalar
#define KA_ISA_NAME "scalar"
#define KA_TABLE_FN quality_kernels_scalar
#include "isa/quality_impl.h"
