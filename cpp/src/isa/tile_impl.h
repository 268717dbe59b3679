// The engine's hot loops, written once and compiled per instruction set (isa/variant.cpp, compiled once per
// ISA with KA_ISA and KA_NS defined, includes this file and exports the table).  A tile of T kernels is
// transposed into "rows in lanes" layout ([entry][row]) so that every per-kernel reduction -- mean, norm, the
// 1-D code, the cosine -- is a vertical SIMD operation, and every dense layer is a register-blocked outer
// product: BB output units x V vectors of rows per micro-kernel, weights broadcast from a packed [in][block]
// panel.
//
// The fused assign pass per tile: load (fp32/fp16) -> centre + L2-normalise -> encoder MLP -> code ->
// decoded pattern (piecewise-linear segment table, or the decoder MLP) -> cosine -> interval label.
// Nothing the size of the input is ever written besides the caller's outputs.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "isa/simd.h"
#include "tile_kernels.h"

namespace kernelatlas {
namespace KA_NS {

#if KA_ISA == 2
constexpr int T = 96;  // kernels per tile
constexpr int BB = 8, V = 3;  // 24 accumulators of 32 zmm
#elif KA_ISA == 1
constexpr int T = 64;
constexpr int BB = 4, V = 2; // 8 accumulators of 16 ymm
#else
constexpr int T = 64;
constexpr int BB = 4, V = 4;
#endif
constexpr int NV = T / W;  // SIMD vectors of rows per tile
static_assert(NV % V == 0, "tile must hold whole register blocks");
static_assert(kBlockOut % BB == 0, "packed block must split into micro-kernel blocks");

// Rows of aux scratch ([8][T]).
enum AuxRow { kGood = 0, kNorm = 1, kCode = 2, kScore = 3, kLabel = 4, kTmp = 5 };

static inline float qnan() { return std::numeric_limits<float>::quiet_NaN(); }

// x rows [r0, r0+rows) -> xt [d][T], zero-padded to T rows.
static void load_tile(const KernelsIn& x, idx_t r0, int rows, float* xt) {
  const int d = x.d;
#if KA_ISA >= 1
  // W rows x W entries at a time: partial row loads, an in-register transpose, column stores
  for (int v = 0; v < NV; ++v) {
    for (int cb = 0; cb < d; cb += W) {
      const int nc = d - cb < W ? d - cb : W;
      vf r[W];
      for (int i = 0; i < W; ++i) {
        const int row = v * W + i;
        const idx_t off = (r0 + row) * d + cb;
        if (row >= rows) {
          r[i] = vset(0.f);
        } else if (x.dtype == DType::float32) {
          r[i] = load_part(static_cast<const float*>(x.data) + off, nc);
        } else {
          r[i] = load_part(static_cast<const uint16_t*>(x.data) + off, nc);
        }
      }
      transpose(r);
      for (int c = 0; c < nc; ++c) vstore(xt + (cb + c) * T + v * W, r[c]);
    }
  }
  return;
#endif
  if (x.dtype == DType::float32) {
    const float* src = static_cast<const float*>(x.data) + r0 * d;  // [rows, d]
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < d; ++j) xt[j * T + r] = src[static_cast<idx_t>(r) * d + j];
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(x.data) + r0 * d;  // [rows, d] fp16 bits
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < d; ++j) xt[j * T + r] = load_half(src + static_cast<idx_t>(r) * d + j);
  }
  if (rows < T)
    for (int j = 0; j < d; ++j)
      for (int r = rows; r < T; ++r) xt[j * T + r] = 0.f;
}

// xt [d][T] -> rows [rows, d] (the inverse of load_tile's transpose).
static void store_rows(const float* xt, int d, int rows, float* out) {
#if KA_ISA >= 1
  for (int v = 0; v < NV && v * W < rows; ++v) {
    for (int cb = 0; cb < d; cb += W) {
      const int nc = d - cb < W ? d - cb : W;
      vf r[W];
      for (int c = 0; c < W; ++c) r[c] = c < nc ? vload(xt + (cb + c) * T + v * W) : vset(0.f);
      transpose(r);
      for (int i = 0; i < W && v * W + i < rows; ++i)
        store_part(out + static_cast<idx_t>(v * W + i) * d + cb, r[i], nc);
    }
  }
#else
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < d; ++j) out[static_cast<idx_t>(r) * d + j] = xt[j * T + r];
#endif
}

// Centre and L2-normalise every row of xt in place.  Dead (max|w| <= min_abs), flat (centred norm
// <= kFlatRelTol max|w|) and non-finite kernels become zero rows; good[r] = 1 for the others.
// norms[r] = centred norm, 0 for dead/flat, NaN for non-finite.
// Each kernel is first scaled by the power of two that brings max|w| into [1, 2) -- exact in binary floating
// point -- so that sums and squares neither overflow (|w| ~ 1e20) nor underflow (|w| ~ 1e-30) in fp32.
static void normalize_tile(float* xt, int d, float min_abs, float* good, float* norms) {
  const vf inf = vset(std::numeric_limits<float>::infinity());
  const vf dv = vset(static_cast<float>(d));
  for (int v = 0; v < NV; ++v) {
    float* col = xt + v * W;
    vf amax = vset(0.f);
    vm finite = mtrue();
    for (int j = 0; j < d; ++j) {
      const vf ax = vabs(vload(col + j * T));
      finite = mand(finite, vlt(ax, inf));
      amax = vmax(amax, ax);
    }
    // 2^-(e) and 2^e with e the (clamped) exponent of max|w|: fields 254 - E and E of normal floats
    const vi e_field = iclamp(vexponent_field(amax), 1, 253);
    const vf scale = vfrom_exponent_field(isub(iset(254), e_field));
    const vf unscale = vfrom_exponent_field(e_field);
    vf sum = vset(0.f);
    for (int j = 0; j < d; ++j) sum = vfma(vload(col + j * T), scale, sum);
    const vf mean = vdiv(sum, dv);
    vf ss = vset(0.f);
    for (int j = 0; j < d; ++j) {
      const vf c = vfma(vload(col + j * T), scale, vsub(vset(0.f), mean));
      vstore(col + j * T, c);
      ss = vfma(c, c, ss);
    }
    const vf norm = vsqrt(ss);  // of the scaled kernel
    const vm live = mnot(vle(amax, vset(min_abs)));
    const vm shaped = vgt(norm, vmul(vset(kFlatRelTol), vmul(amax, scale)));
    const vm ok = mand(finite, mand(live, shaped));
    const vf inv = vsel(ok, vdiv(vset(1.f), norm), vset(0.f));
    for (int j = 0; j < d; ++j) vstore(col + j * T, vsel(ok, vmul(vload(col + j * T), inv), vset(0.f)));
    vstore(good + v * W, vsel(ok, vset(1.f), vset(0.f)));
    vstore(norms + v * W, vsel(finite, vsel(ok, vmul(norm, unscale), vset(0.f)), vset(qnan())));
  }
}

// Activation as a compile-time parameter, so the micro-kernel epilogue stays in registers.
template <Activation A>
static inline vf act(vf x) {
  if constexpr (A == Activation::identity)
    return x;
  else if constexpr (A == Activation::relu)
    return vmax(x, vset(0.f));
  else
    return vactivate(A, x);
}

// dst[b][v0+v] = act(bias[b] + sum_j w[j*stride + b] * src[j][v0+v])  for NB units and NVB row vectors.
template <int NB, int NVB, Activation A>
static inline void dense_micro(const float* w, int stride, const float* bias, int in, const float* src, float* dst,
                               int v0) {
  vf acc[NB][NVB];
  for (int b = 0; b < NB; ++b) {
    const vf bb = vset(bias[b]);
    for (int v = 0; v < NVB; ++v) acc[b][v] = bb;
  }
  for (int j = 0; j < in; ++j) {
    vf xv[NVB];
    for (int v = 0; v < NVB; ++v) xv[v] = vload(src + j * T + (v0 + v) * W);
    const float* wj = w + j * stride;
    for (int b = 0; b < NB; ++b) {
      const vf wb = vset(wj[b]);
      for (int v = 0; v < NVB; ++v) acc[b][v] = vfma(wb, xv[v], acc[b][v]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NVB; ++v) vstore(dst + b * T + (v0 + v) * W, act<A>(acc[b][v]));
}

// dst[out_pad][T] = act(W src + b), src [in][T].
template <Activation A>
static void dense_layer_t(const LayerView& L, const float* src, float* dst) {
  if (L.block == 1) {
    // a single unit (the code layer): all row vectors at once, for enough independent FMA chains
    for (int o = 0; o < L.out_pad; ++o) dense_micro<1, NV, A>(L.w + o * L.in, 1, L.b + o, L.in, src, dst + o * T, 0);
    return;
  }
  for (int ob = 0; ob < L.out_pad; ob += kBlockOut) {
    const float* panel = L.w + static_cast<idx_t>(ob) * L.in;  // [in][kBlockOut]
    for (int boff = 0; boff < kBlockOut; boff += BB)
      for (int v0 = 0; v0 < NV; v0 += V)
        dense_micro<BB, V, A>(panel + boff, kBlockOut, L.b + ob + boff, L.in, src, dst + (ob + boff) * T, v0);
  }
}

static void dense_layer(const LayerView& L, const float* src, float* dst) {
  switch (L.act) {
    case Activation::identity: return dense_layer_t<Activation::identity>(L, src, dst);
    case Activation::relu: return dense_layer_t<Activation::relu>(L, src, dst);
    case Activation::sigmoid: return dense_layer_t<Activation::sigmoid>(L, src, dst);
    case Activation::tanh: return dense_layer_t<Activation::tanh>(L, src, dst);
    case Activation::gelu: return dense_layer_t<Activation::gelu>(L, src, dst);
    case Activation::gelu_tanh: return dense_layer_t<Activation::gelu_tanh>(L, src, dst);
  }
}

// Runs layers[0..n) from src; returns the buffer holding the last output.
static const float* run_layers(const LayerView* layers, int n, const float* src, const TileScratch& s) {
  float* bufs[2] = {s.buf0, s.buf1};
  for (int i = 0; i < n; ++i) {
    float* dst = bufs[i & 1];
    dense_layer(layers[i], src, dst);
    src = dst;
  }
  return src;
}

// Encodes the normalised tile in s.xt; writes the raw code of every row to aux[kCode].
static void encode_normalized(const ModelView& m, const TileScratch& s) {
  const float* z = run_layers(m.enc, m.n_enc, s.xt, s);
  std::memcpy(s.aux + kCode * T, z, sizeof(float) * T);
}

// Count of breakpoints <= z, i.e. the segment index, by a branchless vector binary search.
// lookup(idx) reads breakpoint idx (a gather, or an in-register permute for short tables).
template <class Lookup>
static inline vi find_segment(int n_seg, vf z, Lookup lookup) {
  const int nb = n_seg - 1;
  vi c = iset(0);
  if (nb <= 0) return c;
  int step = 1;
  while (step * 2 <= nb) step *= 2;
  const vi nbv = iset(nb);
  for (; step > 0; step >>= 1) {
    const vi probe = iadd(c, iset(step));
    const vm inside = ile(probe, nbv);
    const vf t = lookup(iadd(imin(probe, nbv), iset(-1)));
    c = isel(mand(inside, vge(z, t)), probe, c);
  }
  return c;
}

// cosine(xt row, decoded(code)) for every row; aux[kCode] holds the codes.
static void cosine_tile(const ModelView& m, bool use_segments, const TileScratch& s, float* scores) {
  const int d = m.d;
  const float* z = s.aux + kCode * T;
#if KA_ISA == 2
  if (use_segments && m.seg_pad > 0) {
    // short table: every lookup is an in-register permute of a column of the transposed table
    const int pad = m.seg_pad;
    for (int v = 0; v < NV; ++v) {
      const vf zv = vload(z + v * W);
      const vi seg = find_segment(m.n_seg, zv, [&](vi idx) { return vlookup(m.seg_t_pad, pad, idx); });
      const vf u = vsub(zv, vlookup(m.seg_zc_pad, pad, seg));
      vf xr = vset(0.f), rr = vset(0.f);
      for (int j = 0; j < d; ++j) {
        const vf r = vfma(u, vlookup(m.seg_b_t + j * pad, pad, seg), vlookup(m.seg_c_t + j * pad, pad, seg));
        xr = vfma(vload(s.xt + j * T + v * W), r, xr);
        rr = vfma(r, r, rr);
      }
      vstore(scores + v * W, vsel(vgt(rr, vset(0.f)), vdiv(xr, vsqrt(rr)), vset(0.f)));
    }
    return;
  }
#endif
  if (use_segments && m.n_seg > 0) {
    const vi dv = iset(d);
    for (int v = 0; v < NV; ++v) {
      const vf zv = vload(z + v * W);
      const vi seg = find_segment(m.n_seg, zv, [&](vi idx) { return vgather(m.seg_t, idx); });
      const vf u = vsub(zv, vgather(m.seg_zc, seg));
      const vi base = imul(seg, dv);
      vf xr = vset(0.f), rr = vset(0.f);
      for (int j = 0; j < d; ++j) {
        const vi idx = iadd(base, iset(j));
        const vf r = vfma(u, vgather(m.seg_b, idx), vgather(m.seg_c, idx));
        xr = vfma(vload(s.xt + j * T + v * W), r, xr);
        rr = vfma(r, r, rr);
      }
      vstore(scores + v * W, vsel(vgt(rr, vset(0.f)), vdiv(xr, vsqrt(rr)), vset(0.f)));
    }
  } else {
    // the decoder MLP, from a copy of the codes (the layer buffers are reused)
    float* zin = s.aux + kTmp * T;
    std::memcpy(zin, z, sizeof(float) * T);
    const float* rec = run_layers(m.dec, m.n_dec, zin, s);  // [d][T]
    for (int v = 0; v < NV; ++v) {
      vf xr = vset(0.f), rr = vset(0.f);
      for (int j = 0; j < d; ++j) {
        const vf r = vload(rec + j * T + v * W);
        xr = vfma(vload(s.xt + j * T + v * W), r, xr);
        rr = vfma(r, r, rr);
      }
      vstore(scores + v * W, vsel(vgt(rr, vset(0.f)), vdiv(xr, vsqrt(rr)), vset(0.f)));
    }
  }
}

// ---------------------------------------------------------------------------------------------- entry points

static void normalize_entry(const KernelsIn& x, idx_t r0, int rows, float min_abs, float* normalized, float* norms,
                            const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  normalize_tile(s.xt, x.d, min_abs, s.aux + kGood * T, s.aux + kNorm * T);
  store_rows(s.xt, x.d, rows, normalized);
  std::memcpy(norms, s.aux + kNorm * T, sizeof(float) * rows);
}

static void encode_entry(const ModelView& m, const KernelsIn& x, idx_t r0, int rows, float min_abs, float* codes,
                         const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  normalize_tile(s.xt, x.d, min_abs, s.aux + kGood * T, s.aux + kNorm * T);
  encode_normalized(m, s);
  const float* good = s.aux + kGood * T;
  const float* z = s.aux + kCode * T;
  for (int r = 0; r < rows; ++r) codes[r] = good[r] != 0.f ? z[r] : qnan();
}

static void decode_entry(const ModelView& m, const float* codes, int rows, float* decoded, const TileScratch& s) {
  float* zin = s.aux + kTmp * T;
  for (int r = 0; r < T; ++r) zin[r] = (r < rows && std::isfinite(codes[r])) ? codes[r] : 0.f;
  const float* rec = run_layers(m.dec, m.n_dec, zin, s);  // [d][T]
  const int d = m.d;
  store_rows(rec, d, rows, decoded);
  for (int r = 0; r < rows; ++r)
    if (!std::isfinite(codes[r]))
      for (int j = 0; j < d; ++j) decoded[static_cast<idx_t>(r) * d + j] = qnan();
}

static void assign_entry(const ModelView& m, const KernelsIn& x, idx_t r0, int rows, const AssignParams& p,
                         int16_t* labels, float* scores, float* codes, const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  float* good = s.aux + kGood * T;
  normalize_tile(s.xt, x.d, p.min_abs, good, s.aux + kNorm * T);
  encode_normalized(m, s);
  float* sc = s.aux + kScore * T;
  cosine_tile(m, p.use_segments, s, sc);
  const float* z = s.aux + kCode * T;
  int32_t lab[T];
  const vf thr = vset(p.threshold);
  for (int v = 0; v < NV; ++v) {
    const vf zv = vload(z + v * W);
    vi label = iset(m.n_int == 0 ? 0 : -1);
    for (int i = 0; i < m.n_int; ++i) {
      const vm hi_ok = (i == m.n_int - 1) ? vle(zv, vset(m.int_hi[i])) : vlt(zv, vset(m.int_hi[i]));
      label = isel(mand(vge(zv, vset(m.int_lo[i])), hi_ok), iset(i), label);
    }
    const vm ok = mand(vgt(vload(good + v * W), vset(0.f)), vge(vload(sc + v * W), thr));
    istore(lab + v * W, isel(ok, label, iset(-1)));
  }
  for (int r = 0; r < rows; ++r) {
    const bool ok = good[r] != 0.f;
    labels[r] = static_cast<int16_t>(lab[r]);
    scores[r] = ok ? sc[r] : 0.f;
    codes[r] = ok ? z[r] : qnan();
  }
}

static void assign_prototypes_entry(const PrototypeView& p, const KernelsIn& x, idx_t r0, int rows, float threshold,
                                    float min_abs, int16_t* labels, float* scores, const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  float* good = s.aux + kGood * T;
  normalize_tile(s.xt, x.d, min_abs, good, s.aux + kNorm * T);
  dense_layer(p.layer, s.xt, s.buf0);  // [n_proto_pad][T] cosines (prototypes are unit vectors)
  int32_t lab[T];
  float best_out[T];
  const vf thr = vset(threshold);
  for (int v = 0; v < NV; ++v) {
    vf best = vload(s.buf0 + v * W);
    vi idx = iset(0);
    for (int q = 1; q < p.n_proto; ++q) {
      const vf sq = vload(s.buf0 + q * T + v * W);
      const vm better = vgt(sq, best);
      best = vsel(better, sq, best);
      idx = isel(better, iset(q), idx);
    }
    const vm g = vgt(vload(good + v * W), vset(0.f));
    best = vsel(g, best, vset(0.f));
    istore(lab + v * W, isel(mand(g, vge(best, thr)), idx, iset(-1)));
    vstore(best_out + v * W, best);
  }
  for (int r = 0; r < rows; ++r) {
    labels[r] = static_cast<int16_t>(lab[r]);
    scores[r] = best_out[r];
  }
}

constexpr int kProbeChains = 12;
static float fma_probe_entry(int64_t iters) {
  vf a[kProbeChains];
  for (int k = 0; k < kProbeChains; ++k) a[k] = vset(1.f + 0.01f * k);
  const vf mul = vset(0.999999f), add = vset(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
    for (int k = 0; k < kProbeChains; ++k) a[k] = vfma(a[k], mul, add);
  vf s = a[0];
  for (int k = 1; k < kProbeChains; ++k) s = vadd(s, a[k]);
  return hsum(s);
}

}  // namespace KA_NS
}  // namespace kernelatlas
