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
#include <type_traits>

#include "isa/simd.h"
#include "tile_kernels.h"

#define KA_ALWAYS_INLINE __attribute__((always_inline))

namespace kernelatlas {
namespace KA_NS {

// Register blocking of the dense micro-kernel: BB units x V row vectors = BB*V accumulators, plus V row vectors
// and one broadcast weight.  FMA units need (pipes x latency) independent chains to stay busy: 2 x 4 = 8 on
// Zen 3/4 and Intel cores, 2 x 5 = 10 on Zen 2, so AVX2 takes 12 (4 x 3 + 3 + 1 = all 16 ymm) rather than the
// 8 of the AVX-512 shape scaled down; AVX-512 takes 24 of its 32 zmm.
#if KA_ISA == 2
constexpr int T = 96;         // kernels per tile
constexpr int BB = 8, V = 3;  // 24 accumulators of 32 zmm
#elif KA_ISA == 1
constexpr int T = 96;
constexpr int BB = 4, V = 3;  // 12 accumulators of 16 ymm
#else
constexpr int T = 64;
constexpr int BB = 4, V = 4;
#endif
constexpr int NV = T / W;  // SIMD vectors of rows per tile
// Row vectors reduced side by side in the per-row reductions (normalise, cosine): independent FMA chains.
constexpr int kGroup = NV % 4 == 0 ? 4 : NV % 3 == 0 ? 3 : NV % 2 == 0 ? 2 : 1;
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
          // a whole-vector load where it stays inside the input (the extra entries are dropped after the
          // transpose): masked loads that miss the cache are several times slower on some cores (Zen 4)
          const float* src = static_cast<const float*>(x.data) + off;
          r[i] = off + W <= x.rows * d ? vload(src) : load_part(src, nc);
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

// xt [d][T] -> rows [rows, d] (the inverse of load_tile's transpose).  The partial last block of columns is
// stored first with whole-vector stores that run into the next row's first entries, which the later blocks
// then overwrite with their values (masked stores are slow on AMD cores); only the tile's last row, whose
// next row belongs to another tile (maybe another thread), gets a masked store.
static void store_rows(const float* xt, int d, int rows, float* out) {
#if KA_ISA >= 1
  const int tail = d % W, cb_tail = d - tail;
  for (int v = 0; v < NV && v * W < rows; ++v) {
    for (int step = 0; step * W < d; ++step) {
      const int cb = tail > 0 ? (step == 0 ? cb_tail : (step - 1) * W) : step * W;
      const int nc = d - cb < W ? d - cb : W;
      vf r[W];
      for (int c = 0; c < W; ++c) r[c] = c < nc ? vload(xt + (cb + c) * T + v * W) : vset(0.f);
      transpose(r);
      for (int i = 0; i < W && v * W + i < rows; ++i) {
        float* dst = out + static_cast<idx_t>(v * W + i) * d + cb;
        if (nc == W || v * W + i + 1 < rows)
          vstore(dst, r[i]);
        else
          store_part(dst, r[i], nc);
      }
    }
  }
#else
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < d; ++j) out[static_cast<idx_t>(r) * d + j] = xt[j * T + r];
#endif
}

// One group of G row vectors of normalize_tile (below).
template <int G>
static inline void normalize_group(float* xt, int d, int v0, float min_abs, float* good, float* norms) {
  const vf inf = vset(std::numeric_limits<float>::infinity());
  const vf dv = vset(static_cast<float>(d));
  float* col = xt + v0 * W;
  vf amax[G], scale[G], mean[G], ss[G];
  vm finite[G];
  for (int g = 0; g < G; ++g) {
    amax[g] = vset(0.f);
    finite[g] = mtrue();
  }
  for (int j = 0; j < d; ++j)
    for (int g = 0; g < G; ++g) {
      const vf ax = vabs(vload(col + j * T + g * W));
      finite[g] = mand(finite[g], vlt(ax, inf));
      amax[g] = vmax(amax[g], ax);
    }
  // 2^-(e) with e the (clamped) exponent of max|w|: field 254 - E of a normal float
  for (int g = 0; g < G; ++g) {
    scale[g] = vfrom_exponent_field(isub(iset(254), iclamp(vexponent_field(amax[g]), 1, 253)));
    mean[g] = vset(0.f);
    ss[g] = vset(0.f);
  }
  for (int j = 0; j < d; ++j)
    for (int g = 0; g < G; ++g) mean[g] = vfma(vload(col + j * T + g * W), scale[g], mean[g]);
  for (int g = 0; g < G; ++g) mean[g] = vsub(vset(0.f), vdiv(mean[g], dv));  // minus the mean
  for (int j = 0; j < d; ++j)
    for (int g = 0; g < G; ++g) {
      const vf c = vfma(vload(col + j * T + g * W), scale[g], mean[g]);
      vstore(col + j * T + g * W, c);
      ss[g] = vfma(c, c, ss[g]);
    }
  vf inv[G];
  vm ok[G];
  for (int g = 0; g < G; ++g) {
    const vf norm = vsqrt(ss[g]);  // of the scaled kernel
    const vm live = mnot(vle(amax[g], vset(min_abs)));
    const vm shaped = vgt(norm, vmul(vset(kFlatRelTol), vmul(amax[g], scale[g])));
    ok[g] = mand(finite[g], mand(live, shaped));
    inv[g] = vsel(ok[g], vdiv(vset(1.f), norm), vset(0.f));
    const vf unscale = vfrom_exponent_field(iclamp(vexponent_field(amax[g]), 1, 253));
    vstore(good + (v0 + g) * W, vsel(ok[g], vset(1.f), vset(0.f)));
    vstore(norms + (v0 + g) * W, vsel(finite[g], vsel(ok[g], vmul(norm, unscale), vset(0.f)), vset(qnan())));
  }
  for (int j = 0; j < d; ++j)
    for (int g = 0; g < G; ++g)
      vstore(col + j * T + g * W, vsel(ok[g], vmul(vload(col + j * T + g * W), inv[g]), vset(0.f)));
}

// Centre and L2-normalise every row of xt in place.  Dead (max|w| <= min_abs), flat (centred norm
// <= kFlatRelTol max|w|) and non-finite kernels become zero rows; good[r] = 1 for the others.
// norms[r] = centred norm, 0 for dead/flat, NaN for non-finite.
// Each kernel is first scaled by the power of two that brings max|w| into [1, 2) -- exact in binary floating
// point -- so that sums and squares neither overflow (|w| ~ 1e20) nor underflow (|w| ~ 1e-30) in fp32.
// The reductions over a row's d entries are serial chains of FMAs (latency-bound), so kGroup vectors of rows
// are reduced side by side: independent chains that fill the FMA pipes.  The value of every row is the same
// whatever the grouping (each row's sums run in the same order).
static void normalize_tile(float* xt, int d, float min_abs, float* good, float* norms) {
  for (int v = 0; v < NV; v += kGroup) normalize_group<kGroup>(xt, d, v, min_abs, good, norms);
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

// The next tile's input, fetched into the cache while this tile's first layer computes: a tile streamed from
// memory loaded at twice its in-cache cost, not overlapped with anything (k = 7: 20 of 148 ns per kernel per core,
// benchmarks/native/tile_breakdown.sh), and the hardware prefetchers do not run a tile ahead.  Its cache lines
// are spread over the first layer's micro-kernel calls, one per input entry of a call, so that the misses
// overlap arithmetic instead of queueing at once.
struct Ahead {
  const char* p = nullptr;  // the first line
  int lines = 0;            // 64-byte lines from p
};

// The next tile after rows [r0, r0 + rows) of x when this worker takes it next (parallel_for hands out runs of
// consecutive tiles), else nothing.
static inline Ahead next_tile(const KernelsIn& x, idx_t r0, int rows) {
  const idx_t next = r0 + rows;
  if (rows < T || next >= x.rows) return {};
  const idx_t elem = x.dtype == DType::float32 ? 4 : 2;
  const idx_t n = std::min<idx_t>(T, x.rows - next) * x.d * elem;
  return {static_cast<const char*>(x.data) + next * x.d * elem, static_cast<int>((n + 63) / 64)};
}

// dst[b][v0+v] = act(bias[b] + sum_j w[j*stride + b] * src[j][v0+v])  for NB units and NVB row vectors; the
// first `ahead.lines` iterations also prefetch a line of ahead.p each.  Always inlined: as a call (GCC 12 did not
// inline it into the layer loop) every call also stored and reloaded its accumulators through the stack, which at
// k = 3 (9 inputs, 9 iterations a call) made the first layer run at 60-70% of the FMA peak instead of 97%.
template <int NB, int NVB, Activation A>
KA_ALWAYS_INLINE static inline void dense_micro(const float* w, int stride, const float* bias, int in, const float* src,
                                                float* dst, int v0, Ahead ahead = {}) {
  vf acc[NB][NVB];
  for (int b = 0; b < NB; ++b) {
    const vf bb = vset(bias[b]);
    for (int v = 0; v < NVB; ++v) acc[b][v] = bb;
  }
  for (int j = 0; j < in; ++j) {
#if KA_ISA >= 1
    if (j < ahead.lines) _mm_prefetch(ahead.p + 64 * j, _MM_HINT_T0);
#endif
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

// dst[out_pad][T] = act(W src + b), src [in][T]; ahead's lines prefetched over the micro-kernel calls.
template <Activation A>
static void dense_layer_t(const LayerView& L, const float* src, float* dst, Ahead ahead) {
  if (L.block == 1) {
    // a single unit (the code layer): all row vectors at once, for enough independent FMA chains
    for (int o = 0; o < L.out_pad; ++o) dense_micro<1, NV, A>(L.w + o * L.in, 1, L.b + o, L.in, src, dst + o * T, 0);
    return;
  }
  const int calls = L.out_pad / BB * (NV / V);
  const int per_call = (ahead.lines + calls - 1) / calls;
  int done = 0;  // lines handed out so far (an offset, so that no pointer runs past the input)
  for (int ob = 0; ob < L.out_pad; ob += kBlockOut) {
    const float* panel = L.w + static_cast<idx_t>(ob) * L.in;  // [in][kBlockOut]
    for (int boff = 0; boff < kBlockOut; boff += BB)
      for (int v0 = 0; v0 < NV; v0 += V) {
        const int n = std::min(per_call, ahead.lines - done);
        dense_micro<BB, V, A>(panel + boff, kBlockOut, L.b + ob + boff, L.in, src, dst + (ob + boff) * T, v0,
                              n > 0 ? Ahead{ahead.p + 64 * static_cast<idx_t>(done), n} : Ahead{});
        done += n;
      }
  }
}

// fn(std::integral_constant<Activation, a>{}): the run-time activation as a compile-time one.
template <class Fn>
static inline void with_activation(Activation a, Fn&& fn) {
  using A = Activation;
  switch (a) {
    case A::identity: return fn(std::integral_constant<A, A::identity>{});
    case A::relu: return fn(std::integral_constant<A, A::relu>{});
    case A::sigmoid: return fn(std::integral_constant<A, A::sigmoid>{});
    case A::tanh: return fn(std::integral_constant<A, A::tanh>{});
    case A::gelu: return fn(std::integral_constant<A, A::gelu>{});
    case A::gelu_tanh: return fn(std::integral_constant<A, A::gelu_tanh>{});
  }
}

static void dense_layer(const LayerView& L, const float* src, float* dst, Ahead ahead = {}) {
  with_activation(L.act, [&](auto a) { dense_layer_t<decltype(a)::value>(L, src, dst, ahead); });
}

// Runs layers[0..n) from src; returns the buffer holding the last output.  The first layer prefetches `ahead`.
static const float* run_layers(const LayerView* layers, int n, const float* src, const TileScratch& s,
                               Ahead ahead = {}) {
  float* bufs[2] = {s.buf0, s.buf1};
  for (int i = 0; i < n; ++i) {
    float* dst = bufs[i & 1];
    dense_layer(layers[i], src, dst, i == 0 ? ahead : Ahead{});
    src = dst;
  }
  return src;
}

#if KA_ISA == 2
// ---- bf16 encoder (Precision::bf16; AVX512_BF16, compiled per function so that the rest of the AVX-512 variant
// still runs on AVX-512 CPUs without it -- the engine checks the CPU before it asks for this path) ----
// A layer's input [in][T] fp32 becomes [(in+1)/2][T] uint32, each the bf16 pair (x[2p], x[2p+1]) of one row
// (rounded to nearest even), so that one vdpbf16ps does two multiply-adds per row lane against a broadcast
// weight pair: twice the MACs per instruction of an fp32 FMA.
#define KA_BF16_TARGET __attribute__((target("avx512bf16")))

KA_BF16_TARGET static inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  // cvtne2ps gives words [bf16(lo) 0..15 | bf16(hi) 0..15]; the permute interleaves them to (lo_i, hi_i) pairs
  alignas(64) static constexpr uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave),
                                  reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// src [in][T] fp32 -> dst [(in+1)/2][T] bf16 pairs; dst may be src (pair p is written over row p, after rows 2p
// and 2p+1 were read, and p <= 2p).
KA_BF16_TARGET static void to_bf16_pairs(const float* src, int in, uint32_t* dst) {
  for (int p = 0; p < (in + 1) / 2; ++p)
    for (int v = 0; v < NV; ++v) {
      const __m512 lo = vload(src + 2 * p * T + v * W);
      const __m512 hi = 2 * p + 1 < in ? vload(src + (2 * p + 1) * T + v * W) : vset(0.f);
      _mm512_storeu_si512(dst + p * T + v * W, bf16_pairs(lo, hi));
    }
}

template <int NB, int NVB, Activation A>
KA_ALWAYS_INLINE KA_BF16_TARGET static inline void dense_micro_bf16(const uint32_t* w, const float* bias, int pairs,
                                                                    const uint32_t* src, float* dst, int v0) {
  __m512 acc[NB][NVB];
  for (int b = 0; b < NB; ++b) {
    const vf bb = vset(bias[b]);
    for (int v = 0; v < NVB; ++v) acc[b][v] = bb;
  }
  for (int p = 0; p < pairs; ++p) {
    __m512bh xv[NVB];
    for (int v = 0; v < NVB; ++v) xv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(src + p * T + (v0 + v) * W));
    const uint32_t* wp = w + p * kBlockOut;
    for (int b = 0; b < NB; ++b) {
      const __m512bh wb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(wp[b])));
      for (int v = 0; v < NVB; ++v) acc[b][v] = _mm512_dpbf16_ps(acc[b][v], xv[v], wb);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NVB; ++v) vstore(dst + b * T + (v0 + v) * W, act<A>(acc[b][v]));
}

template <Activation A>
KA_BF16_TARGET static void dense_layer_bf16_t(const LayerView& L, const uint32_t* src, float* dst) {
  const int pairs = (L.in + 1) / 2;
  for (int ob = 0; ob < L.out_pad; ob += kBlockOut) {
    const uint32_t* panel = L.w_bf16 + static_cast<idx_t>(ob) * pairs;  // [pairs][kBlockOut]
    for (int boff = 0; boff < kBlockOut; boff += BB)
      for (int v0 = 0; v0 < NV; v0 += V)
        dense_micro_bf16<BB, V, A>(panel + boff, L.b + ob + boff, pairs, src, dst + (ob + boff) * T, v0);
  }
}

KA_BF16_TARGET static void dense_layer_bf16(const LayerView& L, const uint32_t* src, float* dst) {
  with_activation(L.act, [&](auto a) { dense_layer_bf16_t<decltype(a)::value>(L, src, dst); });
}

// run_layers with the hidden (blocked) layers in bf16; the code layer (one unit) stays fp32.  The pairs of the
// first layer's input go to the buffer the layer does not write (s.xt stays intact for the cosine); later
// inputs are converted in place.
KA_BF16_TARGET static const float* run_layers_bf16(const LayerView* layers, int n, const float* src,
                                                   const TileScratch& s) {
  float* bufs[2] = {s.buf0, s.buf1};
  for (int i = 0; i < n; ++i) {
    float* dst = bufs[i & 1];
    const LayerView& L = layers[i];
    if (L.w_bf16 == nullptr) {
      dense_layer(L, src, dst);
    } else {
      uint32_t* pairs = reinterpret_cast<uint32_t*>(src == s.xt ? bufs[(i + 1) & 1] : const_cast<float*>(src));
      to_bf16_pairs(src, L.in, pairs);
      dense_layer_bf16(L, pairs, dst);
    }
    src = dst;
  }
  return src;
}
#endif

// Encodes the normalised tile in s.xt; writes the raw code of every row to aux[kCode].
static void encode_normalized(const ModelView& m, Precision precision, const TileScratch& s, Ahead ahead = {}) {
  const float* z = nullptr;
#if KA_ISA == 2
  if (precision == Precision::bf16) z = run_layers_bf16(m.enc, m.n_enc, s.xt, s);
#endif
  if (z == nullptr) z = run_layers(m.enc, m.n_enc, s.xt, s, ahead);  // fp32 (bf16 is refused off AVX-512 by the engine)
  (void)precision;
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

// score = x.r / |r| (x is unit or zero), 0 where r = 0, for G row vectors from v0; r_of(j, g) is entry j of the
// decoded pattern of vector g.  G vectors side by side: 2G independent FMA chains over the d entries.
template <int G, class Recon>
static inline void cosine_group(const float* xt, int d, int v0, float* scores, Recon r_of) {
  vf xr[G], rr[G];
  for (int g = 0; g < G; ++g) xr[g] = rr[g] = vset(0.f);
  for (int j = 0; j < d; ++j)
    for (int g = 0; g < G; ++g) {
      const vf r = r_of(j, g);
      xr[g] = vfma(vload(xt + j * T + (v0 + g) * W), r, xr[g]);
      rr[g] = vfma(r, r, rr[g]);
    }
  for (int g = 0; g < G; ++g)
    vstore(scores + (v0 + g) * W, vsel(vgt(rr[g], vset(0.f)), vdiv(xr[g], vsqrt(rr[g])), vset(0.f)));
}

#if KA_ISA >= 1
// The decoded patterns r = c[s] + u b[s] of the tile (s the row's segment, u = z - zc[s]), built a row at a time
// from the table's contiguous rows, W entries per FMA, and turned into lanes by the in-register transpose:
// rt [d][T].  This replaces two gathers per entry and row vector (slow on every x86 core, and the whole cost
// of the AVX2 path at k = 7) by two plain loads per W entries and row.
constexpr int kLinearSearchMax = 48;  // breakpoints up to which counting beats a gathered binary search
static void decode_segments_t(const ModelView& m, const float* z, float* rt) {
  const int d = m.d;
  alignas(64) int32_t seg[T];
  alignas(64) float u[T];
  const int nb = m.n_seg - 1;
  for (int v = 0; v < NV; ++v) {
    const vf zv = vload(z + v * W);
    vi sv;
    if (nb <= kLinearSearchMax) {
      // the number of breakpoints <= z, counted against broadcasts: no gathers (the breakpoints are sorted,
      // so this is the binary search's answer)
      vi c = iset(0);
      for (int b = 0; b < nb; ++b) c = iinc(vge(zv, vset(m.seg_t[b])), c);
      sv = c;
    } else {
      sv = find_segment(m.n_seg, zv, [&](vi idx) { return vgather(m.seg_t, idx); });
    }
    istore(seg + v * W, sv);
  }
  for (int r = 0; r < T; ++r) u[r] = z[r] - m.seg_zc[seg[r]];
  for (int v = 0; v < NV; ++v) {
    for (int cb = 0; cb < d; cb += W) {
      const int nc = d - cb < W ? d - cb : W;
      vf r[W];
      for (int i = 0; i < W; ++i) {
        const idx_t off = static_cast<idx_t>(seg[v * W + i]) * d + cb;
        r[i] = vfma(vset(u[v * W + i]), load_part(m.seg_b + off, nc), load_part(m.seg_c + off, nc));
      }
      transpose(r);
      for (int c = 0; c < nc; ++c) vstore(rt + (cb + c) * T + v * W, r[c]);
    }
  }
}
#endif

// cosine(xt row, decoded(code)) for every row; aux[kCode] holds the codes.
static void cosine_tile(const ModelView& m, bool use_segments, const TileScratch& s, float* scores) {
  const int d = m.d;
  const float* z = s.aux + kCode * T;
  if (use_segments && m.n_seg > 0) {
#if KA_ISA == 2
    if (m.seg_pad > 0) {
      // short table: every lookup is an in-register permute of a column of the transposed table
      const int pad = m.seg_pad;
      for (int v0 = 0; v0 < NV; v0 += kGroup) {
        vf u[kGroup];
        vi seg[kGroup];
        for (int g = 0; g < kGroup; ++g) {
          const vf zv = vload(z + (v0 + g) * W);
          seg[g] = find_segment(m.n_seg, zv, [&](vi idx) { return vlookup(m.seg_t_pad, pad, idx); });
          u[g] = vsub(zv, vlookup(m.seg_zc_pad, pad, seg[g]));
        }
        cosine_group<kGroup>(s.xt, d, v0, scores, [&](int j, int g) {
          return vfma(u[g], vlookup(m.seg_b_t + j * pad, pad, seg[g]), vlookup(m.seg_c_t + j * pad, pad, seg[g]));
        });
      }
      return;
    }
#endif
#if KA_ISA >= 1
    float* rt = s.buf0;  // free once the code is in aux
    decode_segments_t(m, z, rt);
    for (int v0 = 0; v0 < NV; v0 += kGroup)
      cosine_group<kGroup>(s.xt, d, v0, scores, [&](int j, int g) { return vload(rt + j * T + (v0 + g) * W); });
#else
    // one row per "vector": the lookups are plain indexed loads
    for (int v = 0; v < NV; ++v) {
      const vf zv = vload(z + v * W);
      const vi seg = find_segment(m.n_seg, zv, [&](vi idx) { return vgather(m.seg_t, idx); });
      const vf u = vsub(zv, vgather(m.seg_zc, seg));
      const vi base = imul(seg, iset(d));
      cosine_group<1>(s.xt, d, v, scores, [&](int j, int) {
        const vi idx = iadd(base, iset(j));
        return vfma(u, vgather(m.seg_b, idx), vgather(m.seg_c, idx));
      });
    }
#endif
  } else {
    // the decoder MLP, from a copy of the codes (the layer buffers are reused)
    float* zin = s.aux + kTmp * T;
    std::memcpy(zin, z, sizeof(float) * T);
    const float* rec = run_layers(m.dec, m.n_dec, zin, s);  // [d][T]
    for (int v0 = 0; v0 < NV; v0 += kGroup)
      cosine_group<kGroup>(s.xt, d, v0, scores, [&](int j, int g) { return vload(rec + j * T + (v0 + g) * W); });
  }
}

#if KA_ISA == 2
// ---- the fp32 recheck of bf16 rows near a decision: one row at a time, units in lanes (the packed [in][8]
// panels give 8 units per ymm).  Same operations in the same order as the tile path (bias, then one FMA per
// input in input order; the same activation code), so a rechecked row gets exactly its fp32 result. ----

// layers[0..n) on one row x [in]; returns the buffer holding the output (a or b, each kMaxWidth + W floats).
static const float* run_row(const LayerView* layers, int n, const float* x, float* a, float* b) {
  const float* src = x;
  float* bufs[2] = {a, b};
  for (int i = 0; i < n; ++i) {
    const LayerView& L = layers[i];
    float* dst = bufs[i & 1];
    if (L.block == 1) {
      for (int o = 0; o < L.out_pad; ++o) {
        float acc = L.b[o];
        for (int j = 0; j < L.in; ++j) acc = std::fma(L.w[o * L.in + j], src[j], acc);
        dst[o] = acc;
      }
    } else {
      // up to 8 blocks of 8 units at once: independent FMA chains (one chain would be latency-bound)
      constexpr int G = 8;
      for (int ob0 = 0; ob0 < L.out_pad; ob0 += G * kBlockOut) {
        const int ng = (L.out_pad - ob0) / kBlockOut < G ? (L.out_pad - ob0) / kBlockOut : G;
        __m256 acc[G];
        for (int g = 0; g < G; ++g) acc[g] = g < ng ? _mm256_loadu_ps(L.b + ob0 + g * kBlockOut) : _mm256_setzero_ps();
        const float* panel = L.w + static_cast<idx_t>(ob0) * L.in;  // blocks of [in][kBlockOut]
        for (int j = 0; j < L.in; ++j) {
          const __m256 xj = _mm256_set1_ps(src[j]);
          for (int g = 0; g < G; ++g)
            if (g < ng)
              acc[g] =
                  _mm256_fmadd_ps(_mm256_loadu_ps(panel + (static_cast<idx_t>(g) * L.in + j) * kBlockOut), xj, acc[g]);
        }
        for (int g = 0; g < ng; ++g) _mm256_storeu_ps(dst + ob0 + g * kBlockOut, acc[g]);
      }
    }
    for (int o = 0; o < L.out_pad; o += W) vstore(dst + o, vactivate(L.act, vload(dst + o)));
    src = dst;
  }
  return src;
}

static float cosine_row(const ModelView& m, bool use_segments, const float* x, float z, float* a, float* b) {
  const int d = m.d;
  float xr = 0.f, rr = 0.f;
  if (use_segments && m.n_seg > 0) {
    int seg = 0;
    for (int i = 0; i < m.n_seg - 1; ++i) seg += z >= m.seg_t[i] ? 1 : 0;
    const float u = z - m.seg_zc[seg];
    const float* bs = m.seg_b + static_cast<idx_t>(seg) * d;
    const float* cs = m.seg_c + static_cast<idx_t>(seg) * d;
    for (int j = 0; j < d; ++j) {
      const float r = std::fma(u, bs[j], cs[j]);
      xr = std::fma(x[j], r, xr);
      rr = std::fma(r, r, rr);
    }
  } else {
    const float* r = run_row(m.dec, m.n_dec, &z, a, b);
    for (int j = 0; j < d; ++j) {
      xr = std::fma(x[j], r[j], xr);
      rr = std::fma(r[j], r[j], rr);
    }
  }
  return rr > 0.f ? xr / std::sqrt(rr) : 0.f;
}

static bool near_decision(const ModelView& m, const AssignParams& p, float z, float score) {
  if (std::fabs(score - p.threshold) <= p.recheck_score) return true;
  for (int i = 0; i < m.n_int; ++i)
    if (std::fabs(z - m.int_lo[i]) <= p.recheck_code || std::fabs(z - m.int_hi[i]) <= p.recheck_code) return true;
  return false;
}

// Recomputes code and score in fp32 for the live rows of the tile near a decision (aux[kCode], scores).
static void recheck_bf16(const ModelView& m, const AssignParams& p, int rows, const TileScratch& s, float* scores) {
  const float* good = s.aux + kGood * T;
  float* z = s.aux + kCode * T;
  alignas(64) float x[kMaxDim], a[kMaxWidth + W] = {}, b[kMaxWidth + W] = {};
  for (int r = 0; r < rows; ++r) {
    if (good[r] == 0.f || !near_decision(m, p, z[r], scores[r])) continue;
    for (int j = 0; j < m.d; ++j) x[j] = s.xt[j * T + r];
    z[r] = run_row(m.enc, m.n_enc, x, a, b)[0];
    scores[r] = cosine_row(m, p.use_segments, x, z[r], a, b);
  }
}
#endif

// ---------------------------------------------------------------------------------------------- entry points

// normalize streams its output past the cache (stream_copy) only for rows of at least kStreamMinDim entries (below,
// 3x3, the extra pass over the tile costs more than the stores save) and outputs of at least kStreamMinFloats
// (16 MiB; smaller ones stay in the cache for whoever reads them next)
constexpr int kStreamMinDim = 16;
constexpr idx_t kStreamMinFloats = idx_t{1} << 22;

#if KA_ISA >= 1
// dst[0, n) = src[0, n) with non-temporal stores for the 64-byte lines dst covers whole (src in cache; dst an output
// written once and not read again here): no read-for-ownership of each output line, which otherwise costs as much
// memory traffic as the input.  Ends with a store fence, so the data is visible to whoever reads it next.
static void stream_copy(const float* src, idx_t n, float* dst) {
  const auto addr = reinterpret_cast<uintptr_t>(dst);
  idx_t head = addr % 64 == 0 ? 0 : static_cast<idx_t>((64 - addr % 64) / sizeof(float));
  if (addr % sizeof(float) != 0 || head > n) head = n;  // unaligned floats: plain copy
  std::memcpy(dst, src, sizeof(float) * head);
  idx_t i = head;
  for (; i + 16 <= n; i += 16) {
#if KA_ISA == 2
    _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
#endif
  }
  std::memcpy(dst + i, src + i, sizeof(float) * (n - i));
  _mm_sfence();
}
#endif

static void normalize_entry(const KernelsIn& x, idx_t r0, int rows, float min_abs, float* normalized, float* norms,
                            const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
#if KA_ISA >= 1
  const Ahead ahead = next_tile(x, r0, rows);
  for (int l = 0; l < ahead.lines; ++l) _mm_prefetch(ahead.p + 64 * l, _MM_HINT_T0);
#endif
  normalize_tile(s.xt, x.d, min_abs, s.aux + kGood * T, s.aux + kNorm * T);
#if KA_ISA >= 1
  if (x.d >= kStreamMinDim && x.rows * x.d >= kStreamMinFloats) {
    // the rows into scratch (buf0 holds kMaxDim x T floats for this entry, engine.cpp), then streamed out
    store_rows(s.xt, x.d, rows, s.buf0);
    stream_copy(s.buf0, static_cast<idx_t>(rows) * x.d, normalized);
  } else
#endif
  {
    store_rows(s.xt, x.d, rows, normalized);
  }
  std::memcpy(norms, s.aux + kNorm * T, sizeof(float) * rows);
}

static void encode_entry(const ModelView& m, const KernelsIn& x, idx_t r0, int rows, float min_abs, Precision precision,
                         float* codes, const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  normalize_tile(s.xt, x.d, min_abs, s.aux + kGood * T, s.aux + kNorm * T);
  encode_normalized(m, precision, s, next_tile(x, r0, rows));
  const float* good = s.aux + kGood * T;
  const float* z = s.aux + kCode * T;
  alignas(64) float z_out[T];
  for (int v = 0; v < NV; ++v)
    vstore(z_out + v * W, vsel(vgt(vload(good + v * W), vset(0.f)), vload(z + v * W), vset(qnan())));
  std::memcpy(codes, z_out, sizeof(float) * rows);
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
  encode_normalized(m, p.precision, s, next_tile(x, r0, rows));
  float* sc = s.aux + kScore * T;
  cosine_tile(m, p.use_segments, s, sc);
#if KA_ISA == 2
  if (p.precision == Precision::bf16) recheck_bf16(m, p, rows, s, sc);
#endif
  const float* z = s.aux + kCode * T;
  // the outputs are made whole in vectors of local arrays, then copied: a per-row loop with branches, over
  // outputs the compiler must assume may alias the scratch, cost ~4 ns per kernel at k=3
  alignas(64) int32_t lab[T];
  alignas(64) float sc_out[T], z_out[T];
  const vf thr = vset(p.threshold);
  for (int v = 0; v < NV; ++v) {
    const vf zv = vload(z + v * W);
    vi label = iset(m.n_int == 0 ? 0 : -1);
    for (int i = 0; i < m.n_int; ++i) {
      const vm hi_ok = (i == m.n_int - 1) ? vle(zv, vset(m.int_hi[i])) : vlt(zv, vset(m.int_hi[i]));
      label = isel(mand(vge(zv, vset(m.int_lo[i])), hi_ok), iset(i), label);
    }
    const vm g = vgt(vload(good + v * W), vset(0.f));
    const vf scv = vload(sc + v * W);
    istore(lab + v * W, isel(mand(g, vge(scv, thr)), label, iset(-1)));
    vstore(sc_out + v * W, vsel(g, scv, vset(0.f)));
    vstore(z_out + v * W, vsel(g, zv, vset(qnan())));
  }
  for (int r = 0; r < rows; ++r) labels[r] = static_cast<int16_t>(lab[r]);
  std::memcpy(scores, sc_out, sizeof(float) * rows);
  std::memcpy(codes, z_out, sizeof(float) * rows);
}

static void assign_prototypes_entry(const PrototypeView& p, const KernelsIn& x, idx_t r0, int rows, float threshold,
                                    float min_abs, int16_t* labels, float* scores, const TileScratch& s) {
  load_tile(x, r0, rows, s.xt);
  float* good = s.aux + kGood * T;
  normalize_tile(s.xt, x.d, min_abs, good, s.aux + kNorm * T);
  dense_layer(p.layer, s.xt, s.buf0, next_tile(x, r0, rows));  // [n_proto_pad][T] cosines (unit prototypes)
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
