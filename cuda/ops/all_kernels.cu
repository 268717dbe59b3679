// Every kernel of the CUDA backend, instantiated in one translation unit with no Python or pybind11 around it:
// tests/test_cuda_build.py compiles this file with nvcc and ptxas -v (the module's flags) to read each
// kernel's registers, stack frame and spills for sm_80 and sm_90.  Not part of the module build.
#include "assign.cuh"
#include "assign_prototypes.cuh"
#include "encode.cuh"
#include "normalize.cuh"

namespace kernelatlas {
namespace gpu {
template __global__ void phased_kernel<NormalizeOp>(const NormalizeArgs);
template __global__ void phased_kernel<EncodeOp>(const EncodeArgs);
template __global__ void phased_kernel<AssignOp>(const AssignArgs);
template __global__ void phased_kernel<PrototypesOp>(const PrototypesArgs);
template __global__ void phased_kernel<EncodeOpT<true>>(const EncodeArgs);
template __global__ void phased_kernel<AssignOpT<true>>(const AssignArgs);
}  // namespace gpu
}  // namespace kernelatlas
