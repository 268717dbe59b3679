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
// the blob (through the table, or all of it for the MLP) + load the tile, 1 everything else, per thread.  With
// precision='tf32' (AssignOpT<true>): 1 normalise, 2 the first encoder layer by mma (tensor_core.cuh), 3 the rest.
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
  bool tf32 = false;          // the first encoder layer by TF32 mma (the launcher picks AssignOpT<true>)
  float recheck_code = 0.f;   // TF32: rows whose code is within this of an interval edge, or whose score is
  float recheck_score = 0.f;  // within this of the threshold, are recomputed with the exact first layer
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

// The layers from `first` on (layer first - 1's output in its parity buffer, buf0 for layer 0), then the decode
// and the cosine with the normalised kernel x: the code z and the score.  The encoder, then (with the MLP) the
// decoder, run as one chain of layers: the decoder's first layer reads the code where the encoder left it
// (one inlined copy of the layer code instead of two).
KA_DEV_INLINE void chain_and_score(const AssignArgs& a, const float* mp, const float* x, float* buf0, float* buf1,
                                   int stride, bool mlp, int first, float* z_out, float* score_out) {
  const GpuModel& m = a.m;
  const int n_layers = m.n_enc + (mlp ? m.n_dec : 0);
  const float* src = first == 0 ? x : ((first - 1) & 1 ? buf1 : buf0);
  float z = 0.f;
  for (int i = first; i < n_layers; ++i) {
    float* dst = (i & 1) ? buf1 : buf0;
    dense_column(i < m.n_enc ? m.enc[i] : m.dec[i - m.n_enc], mp, src, dst, stride);
    src = dst;
    if (i == m.n_enc - 1) z = *dst;
  }
  if (!mlp) {
    const int32_t s = segment_of(z, m.n_seg, mp + m.seg_t);
    const float u = z - mp[m.seg_zc + s];
    const float* c = mp + m.seg_c + static_cast<int64_t>(s) * m.d;   // [d]
    const float* sl = mp + m.seg_b + static_cast<int64_t>(s) * m.d;  // [d]
    *score_out = cosine_column(x, stride, m.d, [=](int j) { return std::fma(u, sl[j], c[j]); });
  } else {
    const float* rec = src;  // [d] column of the decoded pattern
    *score_out = cosine_column(x, stride, m.d, [=](int j) { return rec[j * stride]; });
  }
  *z_out = z;
}

// Whether a code / score is within the recheck margins of a decision: the threshold, or an interval edge.
KA_DEV_INLINE bool near_decision(const AssignArgs& a, const float* mp, float z, float score) {
  if (std::fabs(score - a.threshold) <= a.recheck_score) return true;
  for (int i = 0; i < a.m.n_int; ++i)
    if (std::fabs(z - mp[a.m.int_lo + i]) <= a.recheck_code || std::fabs(z - mp[a.m.int_hi + i]) <= a.recheck_code)
      return true;
  return false;
}

template <bool kTf32>
struct AssignOpT {
  using Args = AssignArgs;
  static constexpr int kPhases = kTf32 ? 4 : 2;

  KA_DEV_INLINE static void phase(int p, const Args& a, const BlockCtx& b) {
    const GpuModel& m = a.m;
    const bool mlp = !a.use_segments || m.n_seg == 0;
    const AeLayout L = ae_layout(m, a.stage_floats, mlp, b.threads, kTf32);
    const int stride = row_stride(b.threads);
    const int rows = rows_in_block(a.rows, b);
    const int64_t r0 = b.block * b.threads;
    const float* mp = a.stage_floats > 0 ? b.smem : a.blob;
    if (p == 0) {
      stage(a.blob, a.stage_floats, b, b.smem);
      load_tile(a.x, a.dtype, r0, rows, m.d, b, b.smem + L.xt);
      return;
    }
    if (kTf32 && p == 2) {
      first_layer_tf32(m, L, mp, b);
      return;
    }
    if (b.thread >= rows) return;
    float* x = b.smem + L.xt + b.thread;
    float* buf0 = b.smem + L.buf0 + b.thread;
    float* buf1 = b.smem + L.buf1 + b.thread;
    float* good = b.smem + L.good + b.thread;
    float g, norm;
    if (p == 1) {
      normalize_column(x, stride, m.d, a.min_abs, &g, &norm);
      if (kTf32) {
        *good = g;
        return;
      }
    } else {  // kTf32, p == 3: layer 0 is in buf0
      g = *good;
    }
    float z, score;
    chain_and_score(a, mp, x, buf0, buf1, stride, mlp, kTf32 ? 1 : 0, &z, &score);
    // TF32: a row near a decision (code near an interval edge, score near the threshold) is recomputed with the
    // exact first layer -- then bit-identical to the fp32 path
    if (kTf32 && g != 0.f && near_decision(a, mp, z, score)) {
      dense_column(m.enc[0], mp, x, buf0, stride);
      chain_and_score(a, mp, x, buf0, buf1, stride, mlp, 1, &z, &score);
    }
    const bool ok = g != 0.f;
    const int32_t label = interval_label(z, m.n_int, mp + m.int_lo, mp + m.int_hi);
    a.labels[r0 + b.thread] = static_cast<int16_t>(ok && score >= a.threshold ? label : -1);
    a.scores[r0 + b.thread] = ok ? score : 0.f;
    a.codes[r0 + b.thread] = ok ? z : qnan_f();
  }
};
using AssignOp = AssignOpT<false>;

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
  a.tf32 = a.tf32 && tf32_applies(a.m);
  const LaunchPlan plan = plan_or_throw(ae_row_floats(a.m, mlp, a.tf32), mlp ? a.m.floats_all : a.m.floats_table);
  a.stage_floats = plan.stage_floats;
  if (a.tf32)
    launch_phased<AssignOpT<true>>(a, a.rows, plan.threads, plan.smem_bytes, stream);
  else
    launch_phased<AssignOp>(a, a.rows, plan.threads, plan.smem_bytes, stream);
}
}  // namespace gpu
}  // namespace kernelatlas
#endif
