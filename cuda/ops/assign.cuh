// assign: the fused paper-mode pass, one row per thread -- normalise, encode to the 1-D code, decode it
// (the exact piecewise-linear segment table of a ReLU/identity decoder, or the decoder MLP), take the cosine of
// kernel and reconstruction, label the code by the cluster intervals when the cosine reaches the threshold.
// Nothing besides the three outputs is written to global memory.
//
// The decode and cosine follow the CPU engine (cpp/src/isa/tile_impl.h cosine_tile, cosine_group) expression
// for expression: segment s = the number of breakpoints <= z, u = z - zc[s], r_j = fma(u, b[s][j], c[s][j]),
// x.r and r.r by FMA chains in entry order, score = x.r / sqrt(r.r) (0 when r = 0): a row's label, score and
// code are bit-identical to the AVX2 / AVX-512 engine's.
//
// Shared memory: ae_layout (encode.cuh) -- [staged blob][xt d][buf0 w][buf1 w], rows of T + 1 floats.  Phases: 0 stage
// the blob (through the table, or all of it for the MLP) + load the tile, 1 everything else, per thread.
#pragma once
#include "encode.cuh"

namespace kernelatlas {
namespace gpu {

struct AssignArgs {
  GpuModel m;
  const float* blob = nullptr;  // [m.floats_all]
  int stage_floats = 0;         // blob prefix staged in shared memory: m.floats_table (segments), m.floats_all
                                // (MLP) or 0
  bool use_segments = true;     // false: the decoder MLP (required when m.n_seg == 0)
  const void* x = nullptr;      // [rows, d] float32 or float16
  DType dtype = DType::float32;
  int64_t rows = 0;
  float threshold = 0.85f;
  float min_abs = 0.f;
  int16_t* labels = nullptr;  // [rows]
  float* scores = nullptr;    // [rows]
  float* codes = nullptr;     // [rows]
};

// x.r / |r| for a unit (or zero) column x and r_of(j) the decoded pattern; 0 when r = 0.
template <class Recon>
KA_DEV_INLINE float cosine_column(const float* x, int stride, int d, Recon r_of) {
  float xr = 0.f, rr = 0.f;
  for (int j = 0; j < d; ++j) {
    const float r = r_of(j);
    xr = std::fma(x[j * stride], r, xr);
    rr = std::fma(r, r, rr);
  }
  return rr > 0.f ? xr / std::sqrt(rr) : 0.f;
}

struct AssignOp {
  using Args = AssignArgs;
  static constexpr int kPhases = 2;

  KA_DEV_INLINE static void phase(int p, const Args& a, const BlockCtx& b) {
    const GpuModel& m = a.m;
    const bool mlp = !a.use_segments || m.n_seg == 0;
    const AeLayout L = ae_layout(m, a.stage_floats, mlp, b.threads);
    const int stride = row_stride(b.threads);
    const int rows = rows_in_block(a.rows, b);
    const int64_t r0 = b.block * b.threads;
    if (p == 0) {
      stage(a.blob, a.stage_floats, b, b.smem);
      load_tile(a.x, a.dtype, r0, rows, m.d, b, b.smem + L.xt);
      return;
    }
    if (b.thread >= rows) return;
    const float* mp = a.stage_floats > 0 ? b.smem : a.blob;
    float* x = b.smem + L.xt + b.thread;
    float* buf0 = b.smem + L.buf0 + b.thread;
    float* buf1 = b.smem + L.buf1 + b.thread;
    float good, norm;
    normalize_column(x, stride, m.d, a.min_abs, &good, &norm);
    // the encoder, then (with the MLP) the decoder, as one chain of layers: the decoder's first layer reads the
    // code where the encoder left it (one inlined copy of the layer code instead of two)
    const int n_layers = m.n_enc + (mlp ? m.n_dec : 0);
    const float* src = x;
    float z = 0.f;
    for (int i = 0; i < n_layers; ++i) {
      float* dst = (i & 1) ? buf1 : buf0;
      dense_column(i < m.n_enc ? m.enc[i] : m.dec[i - m.n_enc], mp, src, dst, stride);
      src = dst;
      if (i == m.n_enc - 1) z = *dst;
    }
    float score;
    if (!mlp) {
      const int32_t s = segment_of(z, m.n_seg, mp + m.seg_t);
      const float u = z - mp[m.seg_zc + s];
      const float* c = mp + m.seg_c + static_cast<int64_t>(s) * m.d;   // [d]
      const float* sl = mp + m.seg_b + static_cast<int64_t>(s) * m.d;  // [d]
      score = cosine_column(x, stride, m.d, [=](int j) { return std::fma(u, sl[j], c[j]); });
    } else {
      const float* rec = src;  // [d] column of the decoded pattern
      score = cosine_column(x, stride, m.d, [=](int j) { return rec[j * stride]; });
    }
    const bool ok = good != 0.f;
    const int32_t label = interval_label(z, m.n_int, mp + m.int_lo, mp + m.int_hi);
    a.labels[r0 + b.thread] = static_cast<int16_t>(ok && score >= a.threshold ? label : -1);
    a.scores[r0 + b.thread] = ok ? score : 0.f;
    a.codes[r0 + b.thread] = ok ? z : qnan_f();
  }
};

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
namespace kernelatlas {
namespace gpu {
// labels, scores, codes [rows] from x [rows, d] with the model blob (device pointers), on `stream`.
inline void launch_assign(AssignArgs a, cudaStream_t stream) {
  check_kernels_arg(a.x, a.dtype, a.rows, a.m.d);
  if (a.rows > 0 && (a.labels == nullptr || a.scores == nullptr || a.codes == nullptr || a.blob == nullptr))
    throw std::invalid_argument("assign: null pointer");
  if (a.use_segments && a.m.n_seg == 0) throw std::invalid_argument("assign: the model has no segment table");
  const bool mlp = !a.use_segments;
  const LaunchPlan plan = plan_or_throw(ae_row_floats(a.m, mlp), mlp ? a.m.floats_all : a.m.floats_table);
  a.stage_floats = plan.stage_floats;
  launch_phased<AssignOp>(a, a.rows, plan.threads, plan.smem_bytes, stream);
}
}  // namespace gpu
}  // namespace kernelatlas
#endif
