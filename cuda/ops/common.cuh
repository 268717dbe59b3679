// What every CUDA op shares: the launch context a kernel body sees, the phased kernel that runs the bodies on
// the device, the model blob layout, and the cooperative tile load.
//
// Every op is written once as a struct with `kPhases` phase functions over an explicit (block, thread) and
// the block's shared memory; the phases are separated by __syncthreads() on the device.  Nothing in a phase
// uses CUDA built-ins, so the same code compiles with the host compiler, where the CPU harness
// (cuda/harness.cpp) runs every block and every thread of a launch in phase order and is tested against the
// CPU engine on machines without a GPU.  Whatever a thread must keep from one phase to the next lives in
// shared memory (the harness has no registers that survive a phase).
//
// Layout of a block (as in the CPU engine's tiles, cpp/src/isa/tile_impl.h): one thread per kernel row, rows
// in lanes: shared buffers are [entry][row] with a row stride of T + 1 floats (T = threads per block), so that
// a thread walking its own column and a warp scattering a coalesced load both hit 32 different banks.
#pragma once
#include <cstdint>

#include "kernelatlas/types.h"
#include "kernelatlas/vecmath.h"

#if defined(__CUDACC__)
#define KA_DEV_INLINE __host__ __device__ __forceinline__
#else
#define KA_DEV_INLINE inline
#endif
// Full unrolling of a constant-trip loop in device code (the host compiler unrolls such loops by itself and
// would warn about nvcc's pragma).
#if defined(__CUDA_ARCH__)
#define KA_UNROLL _Pragma("unroll")
#else
#define KA_UNROLL
#endif

namespace kernelatlas {
namespace gpu {

constexpr int kMaxThreads = 128;  // threads (= rows) per block; the launcher may use 64 or 32 for wide models

// The block's view of a launch: which block and thread this is, the block size, and its shared memory.
struct BlockCtx {
  int64_t block;
  int thread;
  int threads;  // T
  float* smem;
};

// ---------------------------------------------------------------------------------------------- model blob
// An autoencoder as one float array (uploaded once, staged per block into shared memory when it fits):
// [intervals lo | hi][encoder layers][segment table t | zc | c | b][decoder layers].  Offsets are in floats.
// Layer weights keep the CPU packing (model.cpp pack): w [out_pad / block][in][block], b [out_pad].
struct GpuLayer {
  int32_t in, out, out_pad, block, act;
  int32_t w, b;  // offsets of the packed weights and the bias
};

struct GpuModel {
  int32_t d = 0;
  int32_t n_enc = 0, n_dec = 0;
  GpuLayer enc[kMaxLayersPerSide] = {};
  GpuLayer dec[kMaxLayersPerSide] = {};
  int32_t enc_width = 0, dec_width = 0;  // widest padded layer of each side
  int32_t n_seg = 0;                     // 0: no table (the decoder MLP only)
  int32_t seg_t = 0, seg_zc = 0, seg_c = 0, seg_b = 0;  // [n_seg - 1], [n_seg], [n_seg, d], [n_seg, d]
  int32_t n_int = 0, int_lo = 0, int_hi = 0;            // [n_int] each
  int32_t floats_enc = 0;    // blob prefix that encode reads (intervals and encoder)
  int32_t floats_table = 0;  // blob prefix that the segment-table path reads (through the table)
  int32_t floats_all = 0;    // the whole blob (the decoder-MLP path)
};

// A prototype set as a blob: the centred, L2-normalised prototypes [n_proto, d], row-major.
struct GpuPrototypes {
  int32_t d = 0;
  int32_t n_proto = 0;
  int32_t floats_all = 0;
};

// ---------------------------------------------------------------------------------------------- shared memory

KA_DEV_INLINE int row_stride(int threads) { return threads + 1; }

// x rows [r0, r0 + rows) -> xt [d][stride], zero for the rows past the input: a coalesced read of the tile's
// contiguous rows * d entries by the whole block (consecutive threads, consecutive entries).
KA_DEV_INLINE void load_tile(const void* x, DType dtype, int64_t r0, int rows, int d, const BlockCtx& b, float* xt) {
  const int stride = row_stride(b.threads);
  const int n = b.threads * d;
  const int live = rows * d;
  for (int i = b.thread; i < n; i += b.threads) {
    const int r = i / d, j = i - r * d;
    float v = 0.f;
    if (i < live) {
      const int64_t off = r0 * d + i;
      v = dtype == DType::float32 ? static_cast<const float*>(x)[off]
                                  : half_to_float(static_cast<const uint16_t*>(x)[off]);
    }
    xt[j * stride + r] = v;
  }
}

// Copies floats [0, n) of a global array into shared memory, the whole block cooperating.
KA_DEV_INLINE void stage(const float* src, int n, const BlockCtx& b, float* dst) {
  for (int i = b.thread; i < n; i += b.threads) dst[i] = src[i];
}

KA_DEV_INLINE int rows_in_block(int64_t rows, const BlockCtx& b) {
  const int64_t left = rows - b.block * b.threads;
  return left < b.threads ? static_cast<int>(left) : b.threads;
}

KA_DEV_INLINE float qnan_f() { return bits_to_float(0x7fc00000u); }

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
namespace kernelatlas {
namespace gpu {
// The device side of every op: its phases in order, a block-wide barrier between two.  Op::phase is inlined
// and the loop unrolled, so each phase compiles to straight-line code with no dispatch.
template <class Op>
__global__ void __launch_bounds__(kMaxThreads) phased_kernel(const typename Op::Args args) {
  extern __shared__ float smem[];
  const BlockCtx b{static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), smem};
  KA_UNROLL
  for (int p = 0; p < Op::kPhases; ++p) {
    if (p > 0) __syncthreads();
    Op::phase(p, args, b);
  }
}
}  // namespace gpu
}  // namespace kernelatlas
#endif

namespace kernelatlas {
namespace gpu {

// ---------------------------------------------------------------------------------------------- launch plans
// Threads per block and whether the model blob is staged in shared memory, for a kernel whose shared memory is
// [staged blob, floats rounded up to 4][row_floats rows of T + 1 floats].  Preference: 128 threads with the
// blob staged; else 128, 64, 32 threads reading the blob from global memory (through L1: every thread of a warp
// reads the same weight, one broadcast transaction).  threads = 0: nothing fits (the caller refuses).
struct LaunchPlan {
  int threads = 0;
  int stage_floats = 0;
  int64_t smem_bytes = 0;
};

inline int64_t align4(int64_t n) { return (n + 3) / 4 * 4; }

inline LaunchPlan plan_launch(int row_floats, int blob_floats, int64_t budget_bytes) {
  LaunchPlan p;
  const auto bytes = [&](int threads, int staged) {
    return static_cast<int64_t>(sizeof(float)) *
           (align4(staged) + static_cast<int64_t>(row_floats) * row_stride(threads));
  };
  if (bytes(kMaxThreads, blob_floats) <= budget_bytes)
    return {kMaxThreads, blob_floats, bytes(kMaxThreads, blob_floats)};
  for (int threads = kMaxThreads; threads >= 32; threads /= 2)
    if (bytes(threads, 0) <= budget_bytes) return {threads, 0, bytes(threads, 0)};
  return p;
}

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

namespace kernelatlas {
namespace gpu {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that the next call starts clean
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Opt-in shared memory per block of the current device (227 KB on sm_90, 163 KB on sm_80).
inline int64_t smem_budget() {
  int dev = 0, bytes = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return bytes;
}

inline void check_kernels_arg(const void* x, DType dtype, int64_t rows, int d) {
  if (rows < 0) throw std::invalid_argument("rows must be >= 0, got " + std::to_string(rows));
  if (d < 1 || d > kMaxDim)
    throw std::invalid_argument("kernels have " + std::to_string(d) + " entries; the engine takes 1.." +
                                std::to_string(kMaxDim));
  if (dtype != DType::float32 && dtype != DType::float16)
    throw std::invalid_argument("kernels must be float32 or float16");
  if (rows > 0 && x == nullptr) throw std::invalid_argument("kernels: null device pointer");
}

// Launches Op over rows (one thread per row, `threads` per block); no launch on empty input.
template <class Op>
void launch_phased(const typename Op::Args& a, int64_t rows, int threads, int64_t smem_bytes, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t blocks = (rows + threads - 1) / threads;
  if (blocks > INT_MAX) throw std::invalid_argument("too many rows for one launch: " + std::to_string(rows));
  check_cuda(cudaFuncSetAttribute(phased_kernel<Op>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_bytes)),
             "cudaFuncSetAttribute(max dynamic shared memory)");
  phased_kernel<Op><<<static_cast<unsigned>(blocks), threads, static_cast<size_t>(smem_bytes), stream>>>(a);
  check_cuda(cudaGetLastError(), "kernel launch");
}

inline LaunchPlan plan_or_throw(int row_floats, int blob_floats) {
  const LaunchPlan plan = plan_launch(row_floats, blob_floats, smem_budget());
  if (plan.threads == 0)
    throw std::invalid_argument("the model's layers are too wide for this GPU's shared memory (" +
                                std::to_string(row_floats) + " floats per row)");
  return plan;
}

}  // namespace gpu
}  // namespace kernelatlas
#endif
