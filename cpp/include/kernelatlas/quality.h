// Per-layer statistics of trained kernels for the CNN Filter DB analyses (reference/README.md B): layer quality
// (sparsity, and the sums and Gram matrices from which the variance entropy of each layer follows) and the
// distribution-shift histograms of coefficients over a global PCA basis.  One streaming pass each over corpora
// of ~10^9 kernels; raw pointers and int64 sizes, no Python.
//
// Segments are layers: segment j is rows [starts[j], stops[j]) of x (empty allowed, overlaps allowed).  A row
// with any NaN/Inf entry is non-finite and excluded from everything but the `nonfinite` count.
//
// Determinism: a segment's results depend only on its own rows -- not on the thread count, the ISA path, or
// the other segments.  Each of 16 lanes accumulates fp32 FMA partial sums over fixed blocks of 1024 rows
// counted from the segment's start (64 rows per lane); blocks are added in float64 in row order, pieces of
// 2^18 rows in order, lanes in order.  Accuracy: a block's fp32 partial has a worst-case relative error of
// about 64 * 2^-24 = 3.8e-6 of sum |w_i w_j| (rounding errors of random data add like a random walk: ~1e-7
// observed), the float64 combination adds ~1e-16.  The fp32 partials hold products up to ~3e38: entries
// beyond |w| ~ 1e19 overflow the plain Gram matrix (never the scaled one, whose entries are <= 1).
//
// Work items are pieces of at most 2^18 rows of one segment.  A segment longer than that keeps 2 (d + 1)^2
// doubles per piece until it is complete (1.6 KB per 2^18 rows of 3x3 kernels) and is read a second time
// for its sparse count; shorter segments (nearly all layers) are read once.  The sparse rows (usually few) are
// read once more, right after their piece, for their own moments.
#pragma once
#include <cstdint>

#include "kernelatlas/types.h"

namespace kernelatlas {

// Output arrays of layer_stats, all C-contiguous, one entry per segment (L = segments, d = entries per kernel).
struct LayerStatsOut {
  int64_t* n = nullptr;            // [L] finite rows (all-zero rows included)
  int64_t* nonfinite = nullptr;    // [L] rows with any NaN/Inf
  int64_t* zeros = nullptr;        // [L] all-zero rows
  int64_t* sparse = nullptr;       // [L] finite rows whose every |w| < 0.01 * max_abs (all of them if max_abs == 0)
  double* max_abs = nullptr;       // [L] max |w| over finite rows (0 if none)
  double* sum = nullptr;           // [L, d] sum of finite rows
  double* gram = nullptr;          // [L, d, d] sum of outer(w, w) over finite rows (full symmetric matrix)
  double* sum_scaled = nullptr;    // [L, d] the same for rows divided by their own max |w| (all-zero rows: 0)
  double* gram_scaled = nullptr;   // [L, d, d]
  double* sum_sparse = nullptr;    // [L, d] sum of the sparse rows (raw), float64 in row order: subtracted from
  double* gram_sparse = nullptr;   // [L, d, d]  sum / gram, they give the moments of the dense rows (entropy_clean)
};

// Every output is overwritten.  starts/stops: [segments], 0 <= start <= stop <= x.rows (checked by the caller).
void layer_stats(const KernelsIn& x, const int64_t* starts, const int64_t* stops, idx_t segments,
                 const LayerStatsOut& out, int threads);

// Coefficients of the finite rows of all segments on a PCA basis: c = basis @ (w' - mean), w' = w / max|w|
// when scale_maxabs (all-zero rows unchanged), else w; computed in float64.
// lo, hi: [n_components] min and max of c over the rows (+inf / -inf when there are none).
// mean: [d], basis: [n_components, d].
void coef_range(const KernelsIn& x, const int64_t* starts, const int64_t* stops, idx_t segments, const double* mean,
                const double* basis, int n_components, bool scale_maxabs, double* lo, double* hi, int threads);

// hist: [n_groups, n_components, bins] int64 (overwritten).  The rows of segment j go to group groups[j]
// (-1: skipped).  bin = floor((c - lo) / (hi - lo) * bins) clamped into [0, bins - 1]: values outside
// [lo, hi] are counted in the edge bins (hi itself falls in the last bin, as in np.histogram).
// groups: [segments] in [-1, n_groups); lo, hi: [n_components], hi > lo.
void coef_histograms(const KernelsIn& x, const int64_t* starts, const int64_t* stops, const int32_t* groups,
                     idx_t segments, int n_groups, const double* mean, const double* basis, int n_components,
                     const double* lo, const double* hi, int bins, bool scale_maxabs, int64_t* hist, int threads);

// Orthogonality of one layer (CVPRW 2022) from its filters x [c_out, m] (x.rows = c_out, x.d = m, any m >= 1):
// rows with a non-finite entry are left out, the others L2-normalised (norms in float64; an all-zero filter stays
// zero), G = F F^T, result 1 - sum |G - I| / (count (count - 1)) with count the finite filters (NaN below two).
// The normalised rows are held as float32 (count x m rounded up to 16, 4 bytes each: the caller bounds it); each
// Gram entry sums fp32 products in fp32 per SIMD lane, the lanes in fp32, then |G - I| in float64.  Error of each
// Gram entry: the rounding of the rows to fp32 (<= 2^-23 relative, so <= 1.2e-7 absolute for unit rows) plus the
// fp32 sums (worst case about (m / 16 + 4) * 2^-24, a random walk of ~sqrt(m / 16) * 2^-24 in practice); the
// result's error is at most the mean of those.  Deterministic for any thread count; the ISAs differ in the last
// bits (their lanes differ).  *count_out receives count.
double orthogonality(const KernelsIn& x, idx_t* count_out, int threads);

}  // namespace kernelatlas
