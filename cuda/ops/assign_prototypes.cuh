// assign_prototypes: label each kernel with the prototype of highest cosine (kernels and prototypes both
// centred and L2-normalised, so the cosine is a dot product), -1 below the threshold or for dead / flat /
// non-finite kernels.  As the CPU engine (tile_impl.h assign_prototypes_entry): each dot product is an FMA
// chain from 0 in entry order, the first of equal maxima wins (strict >), score 0 for rows that are not good.
//
// One thread per row; the prototypes [P, d] (row-major, P <= 256) are read by the whole warp at the same
// address.  Shared memory: [staged prototypes (when they fit)][xt d], rows of T + 1 floats.
// Phases: 0 stage + load the tile, 1 normalise and take the best prototype, per thread.
#pragma once
#include "normalize.cuh"

namespace kernelatlas {
namespace gpu {

struct PrototypesArgs {
  GpuPrototypes p;
  const float* blob = nullptr;  // [n_proto, d] normalised prototypes
  int stage_floats = 0;         // p.floats_all or 0
  const void* x = nullptr;      // [rows, d] float32 or float16
  DType dtype = DType::float32;
  int64_t rows = 0;
  float threshold = 0.85f;
  float min_abs = 0.f;
  int16_t* labels = nullptr;  // [rows]
  float* scores = nullptr;    // [rows]
};

struct PrototypesOp {
  using Args = PrototypesArgs;
  static constexpr int kPhases = 2;
  static int row_floats(const Args& a) { return a.p.d; }

  KA_DEV_INLINE static int64_t xt_offset(int stage_floats) { return (static_cast<int64_t>(stage_floats) + 3) / 4 * 4; }

  KA_DEV_INLINE static void phase(int p, const Args& a, const BlockCtx& b) {
    const int d = a.p.d;
    const int stride = row_stride(b.threads);
    const int rows = rows_in_block(a.rows, b);
    const int64_t r0 = b.block * b.threads;
    float* xt = b.smem + xt_offset(a.stage_floats);
    if (p == 0) {
      stage(a.blob, a.stage_floats, b, b.smem);
      load_tile(a.x, a.dtype, r0, rows, d, b, xt);
      return;
    }
    if (b.thread >= rows) return;
    const float* protos = a.stage_floats > 0 ? b.smem : a.blob;  // [n_proto, d]
    float* x = xt + b.thread;
    float good, norm;
    normalize_column(x, stride, d, a.min_abs, &good, &norm);
    float best = 0.f;
    int32_t idx = 0;
    for (int q = 0; q < a.p.n_proto; ++q) {
      const float* pq = protos + static_cast<int64_t>(q) * d;
      float s = 0.f;
      for (int j = 0; j < d; ++j) s = std::fma(pq[j], x[j * stride], s);
      if (q == 0 || s > best) {
        best = s;
        idx = q;
      }
    }
    const bool ok = good != 0.f;
    best = ok ? best : 0.f;
    a.labels[r0 + b.thread] = static_cast<int16_t>(ok && best >= a.threshold ? idx : -1);
    a.scores[r0 + b.thread] = best;
  }
};

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
namespace kernelatlas {
namespace gpu {
// labels, scores [rows] from x [rows, d] with the normalised prototypes (device pointers), on `stream`.
inline void launch_assign_prototypes(PrototypesArgs a, cudaStream_t stream) {
  check_kernels_arg(a.x, a.dtype, a.rows, a.p.d);
  if (a.rows > 0 && (a.labels == nullptr || a.scores == nullptr || a.blob == nullptr))
    throw std::invalid_argument("assign_prototypes: null pointer");
  const LaunchPlan plan = plan_or_throw(a.p.d, a.p.floats_all);
  a.stage_floats = plan.stage_floats;
  launch_phased<PrototypesOp>(a, a.rows, plan.threads, plan.smem_bytes, stream);
}
}  // namespace gpu
}  // namespace kernelatlas
#endif
