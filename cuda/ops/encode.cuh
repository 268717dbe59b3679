// encode: normalise every kernel and run the encoder MLP to its 1-D code (NaN for dead / flat / non-finite
// kernels).  The dense layers (dense_column, run_layers_column) are shared with assign.
//
// One thread per row runs every layer on its own column of shared memory ([unit][T + 1] buffers, ping-pong):
// no thread reads another's column, so the layers need no barrier.  A layer is computed kBlockOut units at a
// time (the CPU packing, w [out_pad / 8][in][8]): acc[8] stay in registers, each input entry is read once from
// shared memory per 8 FMAs, and the 8 weights are the same for the whole warp (a broadcast).  Each unit's sum
// starts at its bias and adds w[o][j] x[j] by FMA in entry order, as the CPU micro-kernel does, so codes are
// bit-identical to the AVX2 / AVX-512 engine's (activations from vecmath.h's activate_poly).
//
// Shared memory: [staged blob (when it fits)][xt d][buf0 w][buf1 w], rows of T + 1 floats, w the widest
// padded encoder layer.  Phases: 0 stage the blob + load the tile, 1 normalise, encode, write the code.
// With precision='tf32' (EncodeOpT<true>, tensor_core.cuh) the first layer is a warp phase of its own: 0 load,
// 1 normalise (each row's good flag kept in a [good] row after buf1), 2 the first layer by mma, 3 the rest.
#pragma once
#include "normalize.cuh"
#include "tensor_core.cuh"

namespace kernelatlas {
namespace gpu {

// dst[o * stride] = act(b[o] + sum_j w[o][j] src[j * stride]) for the units of one layer, BLK at a time.
template <int BLK>
KA_DEV_INLINE void dense_column_blocks(const GpuLayer& L, const float* mp, const float* src, float* dst, int stride) {
  const Activation act = static_cast<Activation>(L.act);
  for (int ob = 0; ob < L.out_pad; ob += BLK) {
    const float* panel = mp + L.w + static_cast<int64_t>(ob) * L.in;  // [in][BLK]
    float acc[BLK];
    KA_UNROLL
    for (int u = 0; u < BLK; ++u) acc[u] = mp[L.b + ob + u];
    for (int j = 0; j < L.in; ++j) {
      const float xj = src[j * stride];
      KA_UNROLL
      for (int u = 0; u < BLK; ++u) acc[u] = std::fma(panel[j * BLK + u], xj, acc[u]);
    }
    KA_UNROLL
    for (int u = 0; u < BLK; ++u) dst[(ob + u) * stride] = activate_poly(act, acc[u]);
  }
}

KA_DEV_INLINE void dense_column(const GpuLayer& L, const float* mp, const float* src, float* dst, int stride) {
  if (L.block == 1)
    dense_column_blocks<1>(L, mp, src, dst, stride);
  else
    dense_column_blocks<kBlockOut>(L, mp, src, dst, stride);
}

// Runs layers[0, n) on one column from src; returns the column holding the last output (buf0 or buf1).
KA_DEV_INLINE const float* run_layers_column(const GpuLayer* layers, int n, const float* mp, const float* src,
                                             float* buf0, float* buf1, int stride) {
  for (int i = 0; i < n; ++i) {
    float* dst = (i & 1) ? buf1 : buf0;
    dense_column(layers[i], mp, src, dst, stride);
    src = dst;
  }
  return src;
}

// Where each buffer of an autoencoder op lives in shared memory (offsets in floats).
struct AeLayout {
  int64_t xt, buf0, buf1, good, total;
};

// stage_floats: the blob prefix staged at offset 0 (0: the blob is read from global memory); mlp: buffers wide
// enough for the decoder MLP too; tf32: a row for the good flags (the TF32 path's phases).
KA_DEV_INLINE AeLayout ae_layout(const GpuModel& m, int stage_floats, bool mlp, int threads, bool tf32 = false) {
  const int stride = row_stride(threads);
  const int w = mlp && m.dec_width > m.enc_width ? m.dec_width : m.enc_width;
  AeLayout L;
  L.xt = (static_cast<int64_t>(stage_floats) + 3) / 4 * 4;
  L.buf0 = L.xt + static_cast<int64_t>(m.d) * stride;
  L.buf1 = L.buf0 + static_cast<int64_t>(w) * stride;
  L.good = L.buf1 + static_cast<int64_t>(w) * stride;
  L.total = L.good + (tf32 ? stride : 0);
  return L;
}

// Floats per row of T + 1 in ae_layout (for plan_launch).
inline int ae_row_floats(const GpuModel& m, bool mlp, bool tf32 = false) {
  const int w = mlp && m.dec_width > m.enc_width ? m.dec_width : m.enc_width;
  return m.d + 2 * w + (tf32 ? 1 : 0);
}

// The first layer by TF32 mma, as the warp phase of an op (layout L; the tile normalised in xt): layer 0's
// output in buf0, for every row of the warp.
KA_DEV_INLINE void first_layer_tf32(const GpuModel& m, const AeLayout& L, const float* mp, const BlockCtx& b) {
  int row0, lane0;
  if (!warp_lanes(b, &row0, &lane0)) return;
  dense_warp_tf32(m.enc[0], mp, b.smem + L.xt, b.smem + L.buf0, row_stride(b.threads), row0, lane0);
}

struct EncodeArgs {
  GpuModel m;
  const float* blob = nullptr;  // [m.floats_all] in the launch's memory space
  int stage_floats = 0;         // blob prefix staged in shared memory (m.floats_enc or 0)
  const void* x = nullptr;      // [rows, d] float32 or float16
  DType dtype = DType::float32;
  int64_t rows = 0;
  float min_abs = 0.f;
  float* codes = nullptr;  // [rows]
  bool tf32 = false;       // the first layer by TF32 mma (the launcher picks EncodeOpT<true>)
};

template <bool kTf32>
struct EncodeOpT {
  using Args = EncodeArgs;
  static constexpr int kPhases = kTf32 ? 4 : 2;

  KA_DEV_INLINE static void phase(int p, const Args& a, const BlockCtx& b) {
    const AeLayout L = ae_layout(a.m, a.stage_floats, false, b.threads, kTf32);
    const int stride = row_stride(b.threads);
    const int rows = rows_in_block(a.rows, b);
    const int64_t r0 = b.block * b.threads;
    const float* mp = a.stage_floats > 0 ? b.smem : a.blob;
    if (p == 0) {
      stage(a.blob, a.stage_floats, b, b.smem);
      load_tile(a.x, a.dtype, r0, rows, a.m.d, b, b.smem + L.xt);
      return;
    }
    if (kTf32 && p == 2) {
      first_layer_tf32(a.m, L, mp, b);
      return;
    }
    if (b.thread >= rows) return;
    float* x = b.smem + L.xt + b.thread;
    float* good = b.smem + L.good + b.thread;
    float* buf0 = b.smem + L.buf0 + b.thread;
    float* buf1 = b.smem + L.buf1 + b.thread;
    float g, norm;
    if (p == 1) {
      normalize_column(x, stride, a.m.d, a.min_abs, &g, &norm);
      if (kTf32) {
        *good = g;
        return;
      }
    } else {  // kTf32, p == 3: layer 0 is in buf0
      g = *good;
    }
    const float* z = kTf32 ? buf0 : x;  // layer i writes buf0 / buf1 by its parity, as in run_layers_column
    for (int i = kTf32 ? 1 : 0; i < a.m.n_enc; ++i) {
      float* dst = (i & 1) ? buf1 : buf0;
      dense_column(a.m.enc[i], mp, z, dst, stride);
      z = dst;
    }
    a.codes[r0 + b.thread] = g != 0.f ? *z : qnan_f();
  }
};
using EncodeOp = EncodeOpT<false>;

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
namespace kernelatlas {
namespace gpu {
// codes [rows] from x [rows, d] with the model blob (device pointers), on `stream`; a.stage_floats is set here.
inline void launch_encode(EncodeArgs a, cudaStream_t stream) {
  check_kernels_arg(a.x, a.dtype, a.rows, a.m.d);
  if (a.rows > 0 && (a.codes == nullptr || a.blob == nullptr)) throw std::invalid_argument("encode: null pointer");
  a.tf32 = a.tf32 && tf32_applies(a.m);
  const LaunchPlan plan = plan_or_throw(ae_row_floats(a.m, false, a.tf32), a.m.floats_enc);
  a.stage_floats = plan.stage_floats;
  if (a.tf32)
    launch_phased<EncodeOpT<true>>(a, a.rows, plan.threads, plan.smem_bytes, stream);
  else
    launch_phased<EncodeOp>(a, a.rows, plan.threads, plan.smem_bytes, stream);
}
}  // namespace gpu
}  // namespace kernelatlas
#endif
