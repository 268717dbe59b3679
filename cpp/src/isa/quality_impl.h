// The per-layer statistics' hot loops (quality.cpp drives them), written once and compiled per instruction set:
// isa/variant.cpp (compiled once per ISA with KA_ISA and KA_NS defined) includes this file and exports the table.
//
// Rows in lanes, as in tile_impl.h: a sub-block of rows (<= 256, so that it stays in L1) is transposed to
// [entry][row], with a column of ones appended (its products with the entries are the row sums) and a second
// copy divided by each row's max|w|.  The Gram matrices are then register-blocked outer products over those
// columns: accumulator (i, j) holds, per lane, the running sum of x_i * x_j over the lane's rows.  3x3 kernels
// on AVX-512 (the corpus case) get a word-permute transpose of fp16 rows and whole triangle rows per pass
// (TrianglePass); other sizes and ISAs rectangular tiles (gram_tile).
//
// Every ISA uses the same 16 logical lanes (kQualityLanes), the same row-to-lane map and the same FMA order,
// and the fp32 reciprocal of max|w| is correctly rounded everywhere, so layer statistics come out bit-identical
// on the scalar, AVX2 and AVX-512 paths (tested).  The PCA coefficients are float64, with every FMA spelled
// out, so histogram bins agree across ISAs too; the histogram increments, not the arithmetic, bound that pass.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "isa/simd.h"
#include "quality_kernels.h"

namespace kernelatlas {
namespace KA_NS {

constexpr int kL = kQualityLanes;
constexpr int kVecs = kL / W;  // SIMD vectors per group of kL rows
static_assert(kL % W == 0, "a group of rows must be whole vectors");

// Register blocking of the Gram micro-kernel: TI x TJ accumulators + TI loaded columns + 1 streamed column.
#if KA_ISA == 2
constexpr int TI = 2, TJ = 12;  // 27 of 32 zmm
#elif KA_ISA == 1
constexpr int TI = 2, TJ = 5;   // 13 of 16 ymm (the two 8-lane halves of a group run one after the other)
#else
constexpr int TI = 2, TJ = 4;
#endif

// ---- loading rows as columns ----

// Entries [cb, cb + nc) of rows [row, row + W) of x as columns: out[c] holds entry cb + c of the W rows.
// Rows at or past `avail` read as zero (the caller masks them out).
static inline void load_cols(const KernelsIn& x, idx_t row, int avail, int cb, int nc, vf out[W]) {
  const int d = x.d;
#if KA_ISA >= 1
  const idx_t total = x.rows * d;
  for (int i = 0; i < W; ++i) {
    const idx_t off = (row + i) * d + cb;
    if (i >= avail) {
      out[i] = vset(0.f);
    } else if (x.dtype == DType::float32) {
      out[i] = load_part(static_cast<const float*>(x.data) + off, nc);
    } else {
#if KA_ISA == 1
      // AVX2 has no masked 16-bit load (simd.h's load_part copies through a buffer): read a whole vector when
      // the array goes on that far -- the entries past nc belong to the next row and are never used
      if (total - off >= W) {
        out[i] = load_half_vec(static_cast<const uint16_t*>(x.data) + off);
        continue;
      }
#endif
      out[i] = load_part(static_cast<const uint16_t*>(x.data) + off, nc);
    }
  }
  (void)total;
  transpose(out);
#else
  (void)nc;
  const idx_t off = row * d + cb;
  if (avail <= 0) {
    out[0] = 0.f;
  } else if (x.dtype == DType::float32) {
    out[0] = static_cast<const float*>(x.data)[off];
  } else {
    out[0] = load_half(static_cast<const uint16_t*>(x.data) + off);
  }
#endif
}

// ---- the transposed sub-block ----

// Whether the Gram kernel for kernel size D adds the row sums directly (TrianglePass) instead of multiplying by
// the column of ones (gram_tile): fma(w, 1, acc) and acc + w round alike, so both give the same bits, and the
// column is then neither written nor read.
template <int D>
constexpr bool kSumsByAdd = KA_ISA == 2 && D == 9;

struct Counts {
  vf nonfinite, zeros, max_abs;  // per lane; counts stay exact in fp32 up to 2^24 per lane (a piece is 2^18)
};

// Rows [row0, row0 + n) of x, n <= ld, as columns, padded with zero rows to a whole group of kL:
//   xc [d + 1][ld]: the finite rows (non-finite and padding rows are zero); column d is 1 on finite rows
//                   (not written when kSumsByAdd<D>);
//   xs [d + 1][ld]: the same rows divided by their max|w| (all-zero rows stay zero), unless xs is null;
//   rowmax [n rounded up to kL]: max|w| of every finite row, NaN for non-finite and padding rows.
// D > 0: the kernel size as a compile-time constant (the columns of a row vector then stay in registers); 0: x.d.
template <int D>
static void prep(const KernelsIn& x, idx_t row0, int n, int ld, float* xc, float* xs, float* rowmax, Counts& c) {
  const int d = D > 0 ? D : x.d;
  const vf zero = vset(0.f), one = vset(1.f), nan = vset(std::numeric_limits<float>::quiet_NaN());
  const int nvec = (n + kL - 1) / kL * kVecs;
  const bool in_registers = d <= W;  // one chunk of columns: keep them in registers between the two steps
  for (int v = 0; v < nvec; ++v) {
    const int rb = v * W, avail = n - rb;
    vf col[W];
    vi mb = iset(0);
#if KA_ISA >= 1
    {
      // the next sub-block's rows, while this one is transposed: the Gram passes that follow touch only L1,
      // which leaves the hardware prefetcher idle
      // (addresses past the end are harmless: prefetches never fault)
      const int item = x.dtype == DType::float32 ? 4 : 2;
      const uintptr_t next = reinterpret_cast<uintptr_t>(x.data) + static_cast<uintptr_t>((row0 + rb + ld) * d * item);
      for (int b = 0; b < W * d * item; b += 64) prefetch_l1(reinterpret_cast<const void*>(next + b));
    }
#endif
    if (in_registers) {
#if KA_ISA == 2
      if (x.dtype == DType::float16 && d == 9 && avail >= W) {
        mb = load16_f16x9(static_cast<const uint16_t*>(x.data) + (row0 + rb) * 9, col);
      } else
#endif
      {
        load_cols(x, row0 + rb, avail, 0, d, col);
#pragma GCC unroll 16
        for (int j = 0; j < d; ++j) mb = max_bits(mb, abs_bits(col[j]));
      }
    } else {
      for (int cb = 0; cb < d; cb += W) {
        const int nc = d - cb < W ? d - cb : W;
        load_cols(x, row0 + rb, avail, cb, nc, col);
        for (int j = 0; j < nc; ++j) {
          mb = max_bits(mb, abs_bits(col[j]));
          vstore(xc + (cb + j) * ld + rb, col[j]);
        }
      }
    }
    const vm live = lanes_live(avail);
    const vm finite = bits_below(mb, kInfBits);
    const vm valid = mand(live, finite);
    const vm zero_row = bits_zero(mb);
    const vm scaled = mand(valid, mnot(zero_row));
    const vf m = bits_float(mb);
    c.nonfinite = vadd(c.nonfinite, vsel(mand(live, mnot(finite)), one, zero));
    c.zeros = vadd(c.zeros, vsel(mand(valid, zero_row), one, zero));
    c.max_abs = vmax(c.max_abs, vsel(valid, m, zero));
    vstore(rowmax + rb, vsel(valid, m, nan));
    if (!kSumsByAdd<D>) {
      const vf ones = vsel(valid, one, zero);
      vstore(xc + d * ld + rb, ones);
      if (xs) vstore(xs + d * ld + rb, ones);
    }
    // 1 / max|w| overflows for max|w| < 2^-128 (fp32 subnormals): such rows are first scaled up by 2^64 (exact)
    const vm tiny = mand(scaled, vlt(m, vset(0x1p-100f)));
    const vf pre = vsel(tiny, vset(0x1p64f), one);
    const vf inv = vsel(scaled, vdiv(one, vsel(scaled, vmul(m, pre), one)), zero);
    if (all(valid) && !any(tiny)) {  // the common case: nothing to mask, no rescaling
#pragma GCC unroll 16
      for (int j = 0; j < d; ++j) {
        const vf w = in_registers ? col[j] : vload(xc + j * ld + rb);
        if (in_registers) vstore(xc + j * ld + rb, w);
        if (xs) vstore(xs + j * ld + rb, vmul(w, inv));
      }
      continue;
    }
    for (int j = 0; j < d; ++j) {
      const vf w = vsel(valid, in_registers ? col[j] : vload(xc + j * ld + rb), zero);
      vstore(xc + j * ld + rb, w);
      if (xs) vstore(xs + j * ld + rb, vmul(vmul(w, pre), inv));
    }
  }
}

// ---- Gram micro-kernel ----

// Where a sub-block sits in its fp32 block: the first starts the partials at zero, the last adds them to the
// float64 lane sums instead of storing them.
enum SubBlockFlags : int { kFirst = 1, kLast = 2 };

// acc (i, j) += sum over the sub-block's rows of X[i] * X[j], for i in [i0, i0 + A), j in [j0, j0 + B);
// X: [dp][ld] columns, `groups` groups of kL rows; acc32 / acc64: [dp][dp][kL] per-lane partials / sums.
template <int A, int B>
static void gram_tile(const float* X, int ld, int groups, int i0, int j0, int dp, float* acc32, double* acc64,
                      int flags) {
  for (int h = 0; h < kL; h += W) {
    vf acc[A][B];
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a)
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b)
        acc[a][b] = (flags & kFirst) ? vset(0.f) : vload(acc32 + ((i0 + a) * dp + j0 + b) * kL + h);
    const float* xi = X + i0 * ld + h;
    const float* xj = X + j0 * ld + h;
    for (int g = 0; g < groups; ++g) {
      const int o = g * kL;
      vf u[A];
#pragma GCC unroll 16
      for (int a = 0; a < A; ++a) u[a] = vload(xi + a * ld + o);
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) {
        vf t = vload(xj + b * ld + o);
#if KA_ISA >= 1
        __asm__("" : "+v"(t));  // one load per column, not one per FMA (see TrianglePass)
#endif
#pragma GCC unroll 16
        for (int a = 0; a < A; ++a) acc[a][b] = vfma(u[a], t, acc[a][b]);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a)
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) {
        const int at = ((i0 + a) * dp + j0 + b) * kL + h;
        if (flags & kLast) {
          add_f64(acc64 + at, acc[a][b]);
        } else {
          vstore(acc32 + at, acc[a][b]);
        }
      }
  }
}

using GramTileFn = void (*)(const float*, int, int, int, int, int, float*, double*, int);
struct GramTiles {
  GramTileFn fn[TI * TJ];  // [A - 1][B - 1]
};
template <int... K>
static constexpr GramTiles make_gram_tiles(std::integer_sequence<int, K...>) {
  return GramTiles{{&gram_tile<K / TJ + 1, K % TJ + 1>...}};
}
static constexpr GramTiles kGramTiles = make_gram_tiles(std::make_integer_sequence<int, TI * TJ>{});

// The upper triangle (i <= j) of the augmented Gram matrix of X's d + 1 columns, rows i < d, in tiles of TI
// rows starting at the diagonal (a tile's few entries below the diagonal are computed and ignored).
static void gram(const float* X, int ld, int groups, int d, float* acc32, double* acc64, int flags) {
  const int dp = d + 1;
  for (int i0 = 0; i0 < d; i0 += TI) {
    const int a = d - i0 < TI ? d - i0 : TI;
    for (int j0 = i0; j0 < dp; j0 += TJ) {
      const int b = dp - j0 < TJ ? dp - j0 : TJ;
      kGramTiles.fn[(a - 1) * TJ + b - 1](X, ld, groups, i0, j0, dp, acc32, acc64, flags);
    }
  }
}

#if KA_ISA == 2
// One pass over whole rows of the upper triangle, for a kernel size known at compile time: rows R... (< DP - 1)
// of the augmented matrix (DP = d + 1 columns, the last the ones column), row i with its columns j in [i, DP).
// Each column is loaded once per vector of rows and used by every row of the pass; the FMA order per
// accumulator is that of gram_tile, so both give the same bits.  Rows are packed into passes whose
// accumulators and row columns fit the 32 zmm registers.
template <int DP, int... R>
struct TrianglePass {
  static constexpr int kN = sizeof...(R);
  static constexpr int kRows[kN] = {R...};
  static constexpr int kAcc = ((DP - R) + ...);
  static constexpr int first_col() {
    int m = DP;
    for (int k = 0; k < kN; ++k) m = kRows[k] < m ? kRows[k] : m;
    return m;
  }
  // accumulator slot of (row k, column j) is offset(k) + j - kRows[k]
  static constexpr int offset(int k) {
    int o = 0;
    for (int q = 0; q < k; ++q) o += DP - kRows[q];
    return o;
  }

  static void run(const float* X, int ld, int groups, float* acc32, double* acc64, int flags) {
    for (int h = 0; h < kL; h += W) {
      vf acc[kAcc];
#pragma GCC unroll 32
      for (int k = 0; k < kN; ++k)
#pragma GCC unroll 32
        for (int j = kRows[k]; j < DP; ++j)
          acc[offset(k) + j - kRows[k]] = (flags & kFirst) ? vset(0.f) : vload(acc32 + (kRows[k] * DP + j) * kL + h);
      for (int g = 0; g < groups; ++g) {
        const float* base = X + g * kL + h;
        vf u[kN];
#pragma GCC unroll 32
        for (int j = first_col(); j < DP - 1; ++j) {
          vf t = vload(base + j * ld);
          // keep the column in a register: folded into the FMAs as memory operands, it would be loaded once
          // per row of the pass, and loads, not FMAs, then bound the loop
          __asm__("" : "+v"(t));
#pragma GCC unroll 32
          for (int k = 0; k < kN; ++k) {
            if (kRows[k] == j) u[k] = t;
            if (kRows[k] <= j) acc[offset(k) + j - kRows[k]] = vfma(u[k], t, acc[offset(k) + j - kRows[k]]);
          }
        }
        // the last column is the ones column: the sums, by adds (see kSumsByAdd)
#pragma GCC unroll 32
        for (int k = 0; k < kN; ++k) {
          vf& sum = acc[offset(k) + DP - 1 - kRows[k]];
          sum = vadd(u[k], sum);
        }
      }
#pragma GCC unroll 32
      for (int k = 0; k < kN; ++k)
#pragma GCC unroll 32
        for (int j = kRows[k]; j < DP; ++j) {
          const int at = (kRows[k] * DP + j) * kL + h;
          if (flags & kLast) {
            add_f64(acc64 + at, acc[offset(k) + j - kRows[k]]);
          } else {
            vstore(acc32 + at, acc[offset(k) + j - kRows[k]]);
          }
        }
    }
  }
};
#endif

// The Gram kernel for kernel size D (0: any, by tiles).
template <int D>
static void gram_d(const float* X, int ld, int groups, int d, float* acc32, double* acc64, int flags) {
#if KA_ISA == 2
  if constexpr (D == 9) {
    // rows of 10, 9, ..., 2 entries (54 accumulators) in passes of 27, 20 and 7 that load 9, 6 and 3 columns
    // (the first pass: 27 accumulators + 3 row columns + 1 streamed column = 31 of 32 registers, no spills)
    TrianglePass<10, 0, 1, 2>::run(X, ld, groups, acc32, acc64, flags);
    TrianglePass<10, 3, 4, 5, 8>::run(X, ld, groups, acc32, acc64, flags);
    TrianglePass<10, 6, 7>::run(X, ld, groups, acc32, acc64, flags);
    return;
  }
#endif
  gram(X, ld, groups, d, acc32, acc64, flags);
}

// The entries gram() touches in row i: j from the first column of i's tile to d.
static inline int first_col(int i) { return i / TI * TI; }

// ---- kernels ----

template <int D>
static void piece_stats_d(const KernelsIn& x, idx_t r0, idx_t rows, const QualityScratch& s, PieceStats& out) {
  const int d = D > 0 ? D : x.d, dp = d + 1, ld = s.sub_rows;
  const size_t mat = static_cast<size_t>(dp) * dp * kL;
  float* xc = s.cols;
  float* xs = s.cols + static_cast<size_t>(dp) * ld;
  for (int m = 0; m < 2; ++m)
    for (int i = 0; i < d; ++i)
      std::memset(s.acc64 + m * mat + (static_cast<size_t>(i) * dp + first_col(i)) * kL, 0,
                  sizeof(double) * kL * static_cast<size_t>(dp - first_col(i)));
  Counts c{vset(0.f), vset(0.f), vset(0.f)};
  for (idx_t b0 = 0; b0 < rows; b0 += kQualityBlockRows) {
    const idx_t b1 = rows - b0 < kQualityBlockRows ? rows : b0 + kQualityBlockRows;
    for (idx_t s0 = b0; s0 < b1; s0 += ld) {
      const int n = static_cast<int>(b1 - s0 < ld ? b1 - s0 : ld);
      prep<D>(x, r0 + s0, n, ld, xc, xs, s.rowmax + s0, c);
      const int flags = (s0 == b0 ? kFirst : 0) | (s0 + ld >= b1 ? kLast : 0);
      const int groups = (n + kL - 1) / kL;
      gram_d<D>(xc, ld, groups, d, s.acc32, s.acc64, flags);
      gram_d<D>(xs, ld, groups, d, s.acc32 + mat, s.acc64 + mat, flags);
    }
  }
  out.nonfinite = static_cast<idx_t>(hsum(c.nonfinite));
  out.zeros = static_cast<idx_t>(hsum(c.zeros));
  out.max_abs = hmax(c.max_abs);
  // lanes in order, in float64
  for (int m = 0; m < 2; ++m) {
    for (int i = 0; i < d; ++i) {
      for (int j = i; j < dp; ++j) {
        const double* lanes = s.acc64 + m * mat + (static_cast<size_t>(i) * dp + j) * kL;
        double t = 0.0;
        for (int l = 0; l < kL; ++l) t += lanes[l];
        out.acc[(static_cast<size_t>(m) * dp + i) * dp + j] = t;
      }
    }
  }
}

// 3x3 kernels (the corpus case) get a compile-time size; others the generic code.
static void piece_stats(const KernelsIn& x, idx_t r0, idx_t rows, const QualityScratch& s, PieceStats& out) {
  if (x.d == 9) return piece_stats_d<9>(x, r0, rows, s, out);
  piece_stats_d<0>(x, r0, rows, s, out);
}

static void piece_rowmax(const KernelsIn& x, idx_t r0, idx_t rows, const QualityScratch& s) {
  Counts c{vset(0.f), vset(0.f), vset(0.f)};
  for (idx_t s0 = 0; s0 < rows; s0 += s.sub_rows) {
    const int n = static_cast<int>(rows - s0 < s.sub_rows ? rows - s0 : s.sub_rows);
    prep<0>(x, r0 + s0, n, s.sub_rows, s.cols, nullptr, s.rowmax + s0, c);
  }
}

// ---- float64 moments of the sparse rows ----

// Rows scanned per batch: their indices, when sparse, go to a stack list first, so that the accumulation loop
// runs over sparse rows only, without a branch per row.
constexpr int kSparseBatch = 1024;

// Entries [cb, cb + nc) of the row at element offset `at` of x as fp32, lanes past nc zero.
static inline vf load_row_part(const KernelsIn& x, idx_t at, int nc) {
#if KA_ISA == 1
  if (x.dtype == DType::float16 && x.rows * x.d - at >= W)  // a whole vector, the tail masked (see load_cols)
    return vsel(lanes_live(nc), load_half_vec(static_cast<const uint16_t*>(x.data) + at), vset(0.f));
#endif
#if KA_ISA >= 1
  if (x.dtype == DType::float16) return load_part(static_cast<const uint16_t*>(x.data) + at, nc);
  return load_part(static_cast<const float*>(x.data) + at, nc);
#else
  (void)nc;
  if (x.dtype == DType::float16) return load_half(static_cast<const uint16_t*>(x.data) + at);
  return static_cast<const float*>(x.data)[at];
#endif
}

// The lanes of a mask as the low W bits of an integer, lane 0 in bit 0.
static inline unsigned mask_bits(vm m) {
#if KA_ISA == 2
  return m;
#elif KA_ISA == 1
  return static_cast<unsigned>(_mm256_movemask_ps(m));
#else
  return m ? 1u : 0u;
#endif
}

// min(n, W) floats from p (n >= 1), lanes past n undefined but finite or ignored by the caller's mask.
static inline vf load_part_f32(const float* p, int n) {
#if KA_ISA >= 1
  return n >= W ? vload(p) : load_part(p, n);
#else
  (void)n;
  return *p;
#endif
}

// An fp32 vector as W / WD float64 vectors (exact).
static inline void widen(vf a, vd out[W / WD]) {
#if KA_ISA == 2
  out[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
  out[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
#elif KA_ISA == 1
  out[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
  out[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
#else
  out[0] = static_cast<double>(a);
#endif
}

// Adds to sum [d] and to the upper triangle (i <= k) of gram [d, d] the float64 first and second moments of the
// rows r of x[r0, r0 + rows) with rowmax[r] < threshold (NaN rows never are), in row order.  Entries are fp32
// values, so each product w_i w_k is exact in float64 and every Gram entry is the same float64 sum, in the same
// order, whether computed by a scalar loop or WD entries side by side: the bits agree on every ISA (and with
// FMA or without).  Accumulator (i, c) holds entries k in [c * WD, (c + 1) * WD) of Gram row i; vectors wholly
// below the diagonal are skipped, the few entries below it inside a vector are computed and not stored.
template <int D>
static void sparse_moments_d(const KernelsIn& x, idx_t r0, idx_t rows, const float* rowmax, float threshold,
                             double* sum, double* gram) {
  constexpr int kDim = D > 0 ? D : kMaxDim;
  constexpr int kVd = (kDim + WD - 1) / WD;  // float64 vectors per row
  constexpr int kVf = (kDim + W - 1) / W;    // fp32 vectors per row
  const int d = D > 0 ? D : (x.d < kDim ? x.d : kDim);  // (x.d <= kMaxDim: the clamp tells the compiler)
  const int nvd = (d + WD - 1) / WD, nvf = (d + W - 1) / W;
  // (fully unrolled for a compile-time size: the accumulators then live in registers)
  vd acc[kDim][kVd];
  vd acc_sum[kVd];
#pragma GCC unroll 16
  for (int c = 0; c < nvd; ++c) {
    acc_sum[c] = dset(0.0);
#pragma GCC unroll 64
    for (int i = 0; i < d; ++i) acc[i][c] = dset(0.0);
  }
  alignas(64) double wd[kVd * WD];
  int32_t batch[kSparseBatch + W];  // + W: whole-vector stores of the compressed indices
  for (idx_t b0 = 0; b0 < rows; b0 += kSparseBatch) {
    const int nb = static_cast<int>(rows - b0 < kSparseBatch ? rows - b0 : kSparseBatch);
    int n = 0;
    const vf t = vset(threshold);
    for (int r = 0; r < nb; r += W) {  // one compare per vector of rows; sparse rows are a minority
      const int nr = nb - r < W ? nb - r : W;
      const vm below = mand(lanes_live(nr), vlt(load_part_f32(rowmax + b0 + r, nr), t));
#if KA_ISA == 2
      // branch-free: compressed in a register (the memory form of vpcompressd is slow on Zen 4)
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(r),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      _mm512_storeu_si512(batch + n, _mm512_maskz_compress_epi32(below, at));
      n += __builtin_popcount(below);
#else
      for (unsigned bits = mask_bits(below); bits != 0; bits &= bits - 1) batch[n++] = r + __builtin_ctz(bits);
#endif
    }
    for (int q = 0; q < n; ++q) {
      const idx_t at = (r0 + b0 + batch[q]) * d;
#if KA_ISA >= 1
      if (q + 16 < n)
        prefetch_l1(static_cast<const char*>(x.data) +
                    (r0 + b0 + batch[q + 16]) * d * (x.dtype == DType::float16 ? 2 : 4));
#endif
      vd w[kVf * (W / WD)];
#pragma GCC unroll 16
      for (auto& v : w) v = dset(0.0);  // (every used one is written below; this tells the compiler so)
#pragma GCC unroll 8
      for (int f = 0; f < nvf; ++f) {
        const int nc = d - f * W < W ? d - f * W : W;
        widen(load_row_part(x, at + f * W, nc), w + f * (W / WD));
      }
#pragma GCC unroll 16
      for (int c = 0; c < nvd; ++c) {
        dstore(wd + c * WD, w[c]);
        acc_sum[c] = dadd(acc_sum[c], w[c]);
      }
#pragma GCC unroll 64
      for (int i = 0; i < d; ++i) {
        const vd wi = dset(wd[i]);
#pragma GCC unroll 16
        for (int c = i / WD; c < nvd; ++c) acc[i][c] = dfma(wi, w[c], acc[i][c]);
      }
    }
  }
  alignas(64) double lanes[kVd * WD];
#pragma GCC unroll 16
  for (int c = 0; c < nvd; ++c) dstore(lanes + c * WD, acc_sum[c]);
  for (int i = 0; i < d; ++i) sum[i] += lanes[i];
#pragma GCC unroll 64
  for (int i = 0; i < d; ++i) {
#pragma GCC unroll 16
    for (int c = i / WD; c < nvd; ++c) dstore(lanes + c * WD, acc[i][c]);
    for (int k = i; k < d; ++k) gram[i * d + k] += lanes[k];
  }
}

static void sparse_moments(const KernelsIn& x, idx_t r0, idx_t rows, const float* rowmax, float threshold, double* sum,
                           double* gram) {
  if (x.d == 9) return sparse_moments_d<9>(x, r0, rows, rowmax, threshold, sum, gram);
  sparse_moments_d<0>(x, r0, rows, rowmax, threshold, sum, gram);
}

// ---- PCA coefficients, in float64 ----

static_assert(kL % WD == 0, "a group of rows must be whole float64 vectors");

// After prep of n rows into s.cols / s.rowmax (D: the kernel size if fixed): for every vector of WD rows in [0, n
// rounded up to kL) and every component k, c = basis[k] . (w' - mean) with w' = w / max|w| when scaling (w itself for
// all-zero, non-finite and padding rows, which the callers skip), handed to sink(k, row, c).  Multiplying by 1 / max|w|
// instead of dividing differs from w / max|w| by at most 1 ulp of float64.  Every operation is spelled out (FMAs
// included), so every ISA computes the same bits.
template <int D, class Sink>
static void coefs(int d_runtime, int n, int ld, const CoefParams& p, const QualityScratch& s, Sink&& sink) {
  const int d = D > 0 ? D : d_runtime;
  const int n16 = (n + kL - 1) / kL * kL;
  for (int r = 0; r < n16; ++r) {
    const float m = s.rowmax[r];
    s.inv[r] = p.scale_maxabs && m > 0.f ? 1.0 / static_cast<double>(m) : 1.0;
  }
  for (int r = 0; r < n16; r += WD) {
    const vd inv = dload(s.inv + r);
    vd y[D > 0 ? D : kMaxDim];
#pragma GCC unroll 16
    for (int i = 0; i < d; ++i)
      y[i] = dfma(dfrom(s.cols + i * ld + r), inv, dset(-p.mean[i]));  // one rounding, every ISA
    // one component at a time: out-of-order execution overlaps a component's FMA chain with the previous
    // component's sink (interleaving several chains by hand measured slower)
    for (int k = 0; k < p.n_components; ++k) {
      const double* b = p.basis + static_cast<size_t>(k) * d;
      vd c = dmul(dset(b[0]), y[0]);
#pragma GCC unroll 16
      for (int i = 1; i < d; ++i) c = dfma(dset(b[i]), y[i], c);
      sink(k, r, c);
    }
  }
}

template <int D>
static void coef_minmax_d(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                          double* lo, double* hi) {
  Counts c{vset(0.f), vset(0.f), vset(0.f)};
  const int ld = s.sub_rows, nc = p.n_components;
  const double inf = std::numeric_limits<double>::infinity();
  // per component and lane: running min in s.coef [nc][WD], max in s.coef + nc * WD
  double* lo_v = s.coef;
  double* hi_v = s.coef + static_cast<size_t>(nc) * WD;
  for (int k = 0; k < nc; ++k) {
    dstore(lo_v + k * WD, dset(inf));
    dstore(hi_v + k * WD, dset(-inf));
  }
  for (idx_t s0 = 0; s0 < rows; s0 += ld) {
    const int n = static_cast<int>(rows - s0 < ld ? rows - s0 : ld);
    prep<D>(x, r0 + s0, n, ld, s.cols, nullptr, s.rowmax, c);
    coefs<D>(x.d, n, ld, p, s, [&](int k, int r, vd v) {  // non-finite and padding rows have rowmax NaN
      dstore(lo_v + k * WD, dmin(dload(lo_v + k * WD), dfinite_or(v, s.rowmax + r, inf)));
      dstore(hi_v + k * WD, dmax(dload(hi_v + k * WD), dfinite_or(v, s.rowmax + r, -inf)));
    });
  }
  for (int k = 0; k < nc; ++k) {
    for (int l = 0; l < WD; ++l) {
      lo[k] = lo_v[k * WD + l] < lo[k] ? lo_v[k * WD + l] : lo[k];
      hi[k] = hi_v[k * WD + l] > hi[k] ? hi_v[k * WD + l] : hi[k];
    }
  }
}

template <int D>
static void coef_hist_d(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                        uint32_t* hist) {
  const int ld = s.sub_rows, nc = p.n_components, bins = p.bins;
  const int copy = nc * bins + 1;  // one copy of the histogram; its last slot takes the skipped rows
  const vd zero = dset(0.0), top = dset(static_cast<double>(bins - 1));
  for (idx_t s0 = 0; s0 < rows; s0 += ld) {
    const int n = static_cast<int>(rows - s0 < ld ? rows - s0 : ld);
    Counts c{vset(0.f), vset(0.f), vset(0.f)};
    prep<D>(x, r0 + s0, n, ld, s.cols, nullptr, s.rowmax, c);
    coefs<D>(x.d, n, ld, p, s, [&](int k, int r, vd v) {
      // clamped before the conversion (no overflow, NaN-free); floor is truncation on [0, bins - 1]
      const vd t = dmul(dsub(v, dset(p.lo[k])), dset(p.inv_width[k]));
      dstore_i32(s.bin + static_cast<size_t>(k) * ld + r, dmin(dmax(t, zero), top));
    });
    // bins -> slots of one histogram copy; non-finite rows and the padding up to a multiple of 4 -> the last slot
    const int n4 = (n + 3) / 4 * 4;
    for (int k = 0; k < nc; ++k) {
      int32_t* bk = s.bin + static_cast<size_t>(k) * ld;
      for (int r = 0; r < n; ++r) bk[r] += k * bins;
      for (int r = n; r < n4; ++r) bk[r] = copy - 1;
    }
    if (hsum(c.nonfinite) > 0.f)
      for (int r = 0; r < n; ++r)
        if (s.rowmax[r] != s.rowmax[r])
          for (int k = 0; k < nc; ++k) s.bin[static_cast<size_t>(k) * ld + r] = copy - 1;
    // four copies by row & 3: consecutive increments of one bin do not wait on each other
    uint32_t* h0 = hist;
    uint32_t* h1 = hist + copy;
    uint32_t* h2 = hist + 2 * copy;
    uint32_t* h3 = hist + 3 * copy;
    for (int k = 0; k < nc; ++k) {
      const int32_t* bk = s.bin + static_cast<size_t>(k) * ld;
      for (int r = 0; r < n4; r += 4) {
        ++h0[bk[r]];
        ++h1[bk[r + 1]];
        ++h2[bk[r + 2]];
        ++h3[bk[r + 3]];
      }
    }
  }
}

static void coef_minmax(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                        double* lo, double* hi) {
  if (x.d == 9) return coef_minmax_d<9>(x, r0, rows, p, s, lo, hi);
  coef_minmax_d<0>(x, r0, rows, p, s, lo, hi);
}

static void coef_hist(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                      uint32_t* hist) {
  if (x.d == 9) return coef_hist_d<9>(x, r0, rows, p, s, hist);
  coef_hist_d<0>(x, r0, rows, p, s, hist);
}

// ---- orthogonality: sum |G - I| of a layer's L2-normalised filters ----

// Rows and columns of a Gram tile: 16 accumulators, enough independent FMA chains on every ISA.  A work item is a
// panel of rows (quality.cpp: 16), whose rows stay in L2 while every tile of columns from its first on streams
// past them once.
constexpr int kOrthTile = 4;
static_assert((kOrthTile * kOrthTile) % W == 0, "a tile is whole vectors");

// g[4 a + b] = dot(u row i0 + a, u row j0 + b) over mp entries (mp a multiple of W): fp32 products summed per
// lane over mp / W steps, then the lanes (by a transpose, W accumulators at a time).
static inline void orth_tile(const float* u, idx_t mp, idx_t i0, idx_t j0, float g[kOrthTile * kOrthTile]) {
  vf acc[kOrthTile * kOrthTile];
#pragma GCC unroll 16
  for (int t = 0; t < kOrthTile * kOrthTile; ++t) acc[t] = vset(0.f);
  const float* ri = u + i0 * mp;
  const float* rj = u + j0 * mp;
  for (idx_t k = 0; k < mp; k += W) {
    vf a[kOrthTile];
#pragma GCC unroll 4
    for (int q = 0; q < kOrthTile; ++q) a[q] = vload(ri + q * mp + k);
#pragma GCC unroll 4
    for (int b = 0; b < kOrthTile; ++b) {
      const vf t = vload(rj + b * mp + k);
#pragma GCC unroll 4
      for (int q = 0; q < kOrthTile; ++q) acc[q * kOrthTile + b] = vfma(a[q], t, acc[q * kOrthTile + b]);
    }
  }
#pragma GCC unroll 16
  for (int t0 = 0; t0 < kOrthTile * kOrthTile; t0 += W) {
#if KA_ISA >= 1
    transpose(acc + t0);  // lane l of every accumulator in vector l: the sums are W vector adds
#endif
    vf total = acc[t0];
#pragma GCC unroll 16
    for (int l = 1; l < W; ++l) total = vadd(total, acc[t0 + l]);
    vstore(g + t0, total);
  }
}

// Sum over rows i in [p0, p1) and columns j in [i, count) of |G_ij - [i == j]|, off-diagonal entries counted
// twice (G is symmetric), in float64 in a fixed order.  u: [rows rounded up to kOrthTile][mp], the rows past
// count zero; p0 a multiple of kOrthTile.
static double orth_panel(const float* u, idx_t count, idx_t mp, idx_t p0, idx_t p1) {
  const idx_t rows = (count + kOrthTile - 1) / kOrthTile * kOrthTile;
  double total = 0.0;
  for (idx_t j0 = p0; j0 < rows; j0 += kOrthTile) {  // a tile of columns, against every tile of the panel
    for (idx_t i0 = p0; i0 < p1 && i0 <= j0; i0 += kOrthTile) {
      alignas(64) float g[kOrthTile * kOrthTile];
      orth_tile(u, mp, i0, j0, g);
      for (int a = 0; a < kOrthTile; ++a) {
        const idx_t i = i0 + a;
        for (int b = 0; b < kOrthTile; ++b) {
          const idx_t j = j0 + b;
          if (i >= count || j >= count || j < i) continue;
          const double v = static_cast<double>(g[a * kOrthTile + b]);
          total += i == j ? std::fabs(v - 1.0) : 2.0 * std::fabs(v);
        }
      }
    }
  }
  return total;
}

// ---- label counts of assign outputs ----

// Rows of one segment in blocks that stay in L1: with few labels, one compare-and-count pass per label value
// over the block (the compiler vectorises it at this variant's width) beats a scattered histogram, whose
// increments serialise on repeated labels.
constexpr idx_t kCountBlock = 4096;
constexpr int kFewLabels = 32;

static void count_labels(const int16_t* labels, const float* values, idx_t a, idx_t b, int n_labels, bool nan_is_dead,
                         int64_t* row) {
  const int width = n_labels + 2;
  int64_t dead = 0;
  for (idx_t r0 = a; r0 < b; r0 += kCountBlock) {
    const idx_t r1 = b - r0 < kCountBlock ? b : r0 + kCountBlock;
    if (n_labels + 1 <= kFewLabels) {
      for (int v = -1; v < n_labels; ++v) {
        uint16_t c = 0;  // <= kCountBlock: int16 lanes, no widening in the loop
        const int16_t vv = static_cast<int16_t>(v);
        for (idx_t r = r0; r < r1; ++r) c = static_cast<uint16_t>(c + (labels[r] == vv));
        row[v + 1] += c;
      }
    } else {
      for (idx_t r = r0; r < r1; ++r) {
        const int lab = labels[r] + 1;
        if (lab >= 0 && lab <= n_labels) row[lab] += 1;
      }
    }
    int32_t d = 0;
    if (nan_is_dead) {
      for (idx_t r = r0; r < r1; ++r) d += values[r] != values[r];
    } else {
      for (idx_t r = r0; r < r1; ++r) d += (labels[r] == -1) & (values[r] == 0.0f);
    }
    dead += d;
  }
  row[width - 1] += dead;
}

}  // namespace KA_NS
}  // namespace kernelatlas
