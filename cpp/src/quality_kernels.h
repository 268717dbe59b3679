// The table of per-ISA kernels behind the per-layer statistics (quality.cpp): generic code in
// isa/quality_impl.h, built per instruction set into the same variants as the tile kernels (isa/variant.cpp)
// and taken from the registry (isa_registry.h) once per call.
//
// A work item is one piece of one segment (layer): at most kQualityPieceRows rows starting at the segment's
// start plus a multiple of kQualityPieceRows.  Kernels see one piece at a time, raw pointers into per-thread
// scratch, no heap, no exceptions -- the same rules as tile_kernels.h.
#pragma once
#include <cstdint>

#include "kernelatlas/types.h"

namespace kernelatlas {

// Rows per fp32 partial sum, counted from the segment's start: each of the kQualityLanes lanes accumulates
// kQualityBlockRows / kQualityLanes = 64 rows in fp32 (FMA), then the block is added in float64.
constexpr int kQualityBlockRows = 1024;
constexpr int kQualityLanes = 16;  // logical accumulation lanes, the same on every ISA (results are too)
constexpr idx_t kQualityPieceRows = idx_t{1} << 18;  // rows per work item, a multiple of the block
static_assert(kQualityPieceRows % kQualityBlockRows == 0, "pieces must hold whole blocks");

// Per-thread scratch, carved by quality.cpp from one 64-byte aligned allocation.  dp = d + 1 (the kernel
// entries plus a column of ones, whose products with the entries are the sums); sub = sub_rows.
struct QualityScratch {
  int sub_rows = 0;          // rows transposed at a time (a power of two dividing the block, >= kQualityLanes)
  float* cols = nullptr;     // [2][dp][sub]  finite rows as columns; then the same rows scaled by max|w|
  float* rowmax = nullptr;   // [kQualityPieceRows + kQualityLanes]  max|w| per row of the piece, NaN if non-finite
  float* acc32 = nullptr;    // [2][dp][dp][kQualityLanes]  fp32 partials of the current block (upper triangle)
  double* acc64 = nullptr;   // [2][dp][dp][kQualityLanes]  float64 sums of the blocks, per lane
  double* inv = nullptr;     // [sub]     1 / max|w| (1 when not scaling or all-zero)
  double* coef = nullptr;    // [n_components][sub]  (coef_minmax: running min and max per lane)
  int32_t* bin = nullptr;    // [n_components][sub]
};

// What one piece contributes to its segment.
struct PieceStats {
  idx_t nonfinite = 0;
  idx_t zeros = 0;
  float max_abs = 0.f;     // over finite rows (0 if none)
  double* acc = nullptr;   // [2][dp][dp]: [0] plain, [1] max-abs-scaled; entry (i, j), i <= j < d, is
                          // sum w_i w_j and (i, d) is sum w_i.  Entries below the diagonal are not written.
};

// The PCA projection shared by coef_range and coef_histograms.
struct CoefParams {
  int n_components = 0;
  bool scale_maxabs = true;
  const double* mean = nullptr;  // [d]
  const double* basis = nullptr;  // [n_components, d]
  const double* lo = nullptr;  // [n_components]  histogram only
  const double* inv_width = nullptr;  // [n_components]  bins / (hi - lo), histogram only
  int bins = 0;  // histogram only
};

struct QualityKernels {
  // Statistics of x rows [r0, r0 + rows), rows <= kQualityPieceRows, r0 = segment start + k * piece:
  // out.acc is overwritten; s.rowmax[0, rows) receives the max|w| of every row (NaN for non-finite rows).
  void (*piece_stats)(const KernelsIn& x, idx_t r0, idx_t rows, const QualityScratch& s, PieceStats& out);
  // Only s.rowmax[0, rows) (for the sparse count of segments longer than one piece).
  void (*piece_rowmax)(const KernelsIn& x, idx_t r0, idx_t rows, const QualityScratch& s);
  // Adds to sum [d] and to the upper triangle (i <= k) of gram [d, d] the float64 moments of the rows r of
  // x[r0, r0 + rows) with rowmax[r] < threshold, each entry summed in row order (bit-identical on every ISA).
  void (*sparse_moments)(const KernelsIn& x, idx_t r0, idx_t rows, const float* rowmax, float threshold, double* sum,
                         double* gram);
  // Per component min and max of the coefficients of the finite rows, folded into lo / hi [n_components].
  void (*coef_minmax)(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                      double* lo, double* hi);
  // Adds the finite rows' bins to hist [4][n_components * bins + 1]: four copies, by row & 3 (repeated
  // increments of one bin by consecutive rows then do not wait on each other), each with a last slot that
  // collects the skipped rows (to be ignored).
  void (*coef_hist)(const KernelsIn& x, idx_t r0, idx_t rows, const CoefParams& p, const QualityScratch& s,
                    uint32_t* hist);
  // The label statistics of assign outputs (engine.h label_counts) for rows [a, b) of one segment, added to
  // row [n_labels + 2]: label -1, each cluster, then the dead kernels (value NaN if nan_is_dead, else label -1
  // with value 0).  Labels outside [-1, n_labels) are not counted.
  void (*count_labels)(const int16_t* labels, const float* values, idx_t a, idx_t b, int n_labels, bool nan_is_dead,
                       int64_t* row);
  // Orthogonality of a layer: sum over rows i in [p0, p1) (p0 a multiple of 4) and columns j in [i, count) of
  // |G_ij - [i == j]|, off-diagonal entries twice, where G = U U^T; u: [count rounded up to 4][mp] float32
  // L2-normalised rows, zero past count and past the row's entries (mp a multiple of 16).
  double (*orth_panel)(const float* u, idx_t count, idx_t mp, idx_t p0, idx_t p1);
};

}  // namespace kernelatlas
