// Drivers of the per-layer statistics (kernelatlas/quality.h): split segments into pieces of at most
// kQualityPieceRows rows (always counted from the segment's start, so a segment's results never depend on the
// thread count or on its neighbours), run the ISA's kernels over the pieces in the one parallel-for
// (parallel.h), and combine the pieces of each segment in order.  Also the per-segment label counts of assign
// outputs (label_counts), the same split into pieces over the same kernel table.
//
// Sparsity needs a segment's max|w| before its rows can be counted.  The piece kernel leaves every row's max|w|
// in per-thread scratch, so a segment that fits in one piece (nearly every layer: the CNN Filter DB averages
// 68k filters per layer) is counted right away from that buffer; longer segments are counted in a second pass
// over their rows once all their pieces are combined.
#include "kernelatlas/quality.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "isa_registry.h"
#include "kernelatlas/engine.h"
#include "kernelatlas/vecmath.h"
#include "parallel.h"
#include "quality_kernels.h"

namespace kernelatlas {
namespace {

const QualityKernels& kernels() { return *active_variant().quality; }

// Rows transposed at a time: the plain and the scaled copy of a sub-block together stay within 32 KB (L1).
int sub_rows_for(int d) {
  int sub = 256;
  while (sub > 32 && 2 * static_cast<size_t>(d + 1) * sub * sizeof(float) > 32 * 1024) sub /= 2;
  return sub;
}

// One worker's QualityScratch.  stats: room for piece_stats (Gram partials, a piece of row maxima); else for
// the coefficient kernels.
QualityScratch carve_quality_scratch(Slices& slices, int d, int n_components, bool stats) {
  const size_t dp = static_cast<size_t>(d) + 1, lanes = kQualityLanes;
  const int sub = sub_rows_for(d);
  const size_t sub_z = static_cast<size_t>(sub);
  const size_t acc = stats ? 2 * dp * dp * lanes : 0;
  const size_t nc = static_cast<size_t>(n_components);
  QualityScratch s;
  s.sub_rows = sub;
  s.cols = slices.take<float>(2 * dp * sub_z);
  s.rowmax = slices.take<float>((stats ? static_cast<size_t>(kQualityPieceRows) : sub_z) + lanes);
  s.acc32 = slices.take<float>(acc);
  s.acc64 = slices.take<double>(acc);
  s.inv = slices.take<double>(stats ? 0 : sub_z);
  s.coef = slices.take<double>(stats ? 0 : nc * sub_z);
  s.bin = slices.take<int32_t>(stats ? 0 : nc * sub_z);
  return s;
}

using QualityArena = ScratchArena<QualityScratch>;

struct Piece {
  idx_t segment;
  idx_t r0;
  idx_t rows;
  idx_t index;  // within its segment
};

// Pieces of the segments for which keep(j) holds, in segment order; returns the rows they cover.
template <class Keep>
idx_t split(const int64_t* starts, const int64_t* stops, idx_t segments, Keep&& keep, std::vector<Piece>& pieces) {
  idx_t rows = 0;
  for (idx_t j = 0; j < segments; ++j) {
    if (!keep(j)) continue;
    for (idx_t r = starts[j], p = 0; r < stops[j]; r += kQualityPieceRows, ++p)
      pieces.push_back({j, r, std::min<idx_t>(kQualityPieceRows, stops[j] - r), p});
    rows += stops[j] - starts[j];
  }
  return rows;
}

// Rows are sparse when max|w| < 0.01 * the segment's max|w|, in float64 as the reference computes it: for a
// float m, m < t exactly when m < t rounded up to a float.
float sparse_threshold(float max_abs) {
  const double t = 0.01 * static_cast<double>(max_abs);
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// rowmax: [rows], NaN for non-finite rows (never counted).
idx_t count_below(const float* rowmax, idx_t rows, float threshold) {
  idx_t count = 0;
  for (idx_t r = 0; r < rows; ++r) count += rowmax[r] < threshold;
  return count;
}

// The lower triangle of a [d, d] matrix from its upper one.
void mirror_upper(double* g, int d) {
  for (int i = 0; i < d; ++i)
    for (int k = i + 1; k < d; ++k) g[k * d + i] = g[i * d + k];
}

struct SegmentTotals {
  idx_t nonfinite = 0, zeros = 0;
  float max_abs = 0.f;
};

// Segment j's outputs from its combined totals; acc: [2][d + 1][d + 1], upper triangle.
void write_segment(const LayerStatsOut& out, idx_t j, int d, idx_t rows, const SegmentTotals& t, const double* acc) {
  const int dp = d + 1;
  const size_t dd = static_cast<size_t>(d) * d;
  out.n[j] = rows - t.nonfinite;
  out.nonfinite[j] = t.nonfinite;
  out.zeros[j] = t.zeros;
  out.max_abs[j] = t.max_abs;
  double* sums[2] = {out.sum + j * d, out.sum_scaled + j * d};
  double* grams[2] = {out.gram + j * dd, out.gram_scaled + j * dd};
  for (int m = 0; m < 2; ++m) {
    const double* a = acc + static_cast<size_t>(m) * dp * dp;
    for (int i = 0; i < d; ++i) {
      sums[m][i] = a[i * dp + d];
      for (int k = i; k < d; ++k) grams[m][i * d + k] = grams[m][k * d + i] = a[i * dp + k];
    }
  }
}

}  // namespace

void layer_stats(const KernelsIn& x, const int64_t* starts, const int64_t* stops, idx_t segments,
                 const LayerStatsOut& out, int threads) {
  const QualityKernels& k = kernels();
  const int d = x.d, dp = d + 1;
  const size_t acc_n = 2 * static_cast<size_t>(dp) * dp;
  const size_t dd = static_cast<size_t>(d) * d;
  std::fill(out.n, out.n + segments, 0);
  std::fill(out.nonfinite, out.nonfinite + segments, 0);
  std::fill(out.zeros, out.zeros + segments, 0);
  std::fill(out.sparse, out.sparse + segments, 0);
  std::fill(out.max_abs, out.max_abs + segments, 0.0);
  std::fill(out.sum, out.sum + segments * d, 0.0);
  std::fill(out.sum_scaled, out.sum_scaled + segments * d, 0.0);
  std::fill(out.gram, out.gram + segments * dd, 0.0);
  std::fill(out.gram_scaled, out.gram_scaled + segments * dd, 0.0);
  std::fill(out.sum_sparse, out.sum_sparse + segments * d, 0.0);
  std::fill(out.gram_sparse, out.gram_sparse + segments * dd, 0.0);

  std::vector<Piece> pieces;
  const idx_t rows = split(starts, stops, segments, [](idx_t) { return true; }, pieces);
  // segments of several pieces keep each piece's results (slot) until all are done
  std::vector<idx_t> first_slot(static_cast<size_t>(segments), -1);
  idx_t slots = 0;
  for (idx_t j = 0; j < segments; ++j) {
    const idx_t n_pieces = (stops[j] - starts[j] + kQualityPieceRows - 1) / kQualityPieceRows;
    if (n_pieces > 1) {
      first_slot[static_cast<size_t>(j)] = slots;
      slots += n_pieces;
    }
  }
  std::vector<double> slot_acc(static_cast<size_t>(slots) * acc_n);
  std::vector<SegmentTotals> slot_totals(static_cast<size_t>(slots));

  threads = workers_for(rows, static_cast<idx_t>(pieces.size()), threads);
  const QualityArena scratch(threads, [&](Slices& sl) { return carve_quality_scratch(sl, d, 0, true); });
  std::vector<double> thread_acc(static_cast<size_t>(threads) * acc_n);

  // dynamic scheduling, one piece at a time: pieces differ in size at segment ends
  parallel_for(static_cast<idx_t>(pieces.size()), threads, 1, [&](int t, idx_t i) {
    const Piece& p = pieces[static_cast<size_t>(i)];
    const QualityScratch& s = scratch[t];
    const idx_t slot0 = first_slot[static_cast<size_t>(p.segment)];
    PieceStats ps;
    ps.acc = slot0 < 0 ? thread_acc.data() + static_cast<size_t>(t) * acc_n
                       : slot_acc.data() + static_cast<size_t>(slot0 + p.index) * acc_n;
    k.piece_stats(x, p.r0, p.rows, s, ps);
    const SegmentTotals totals{ps.nonfinite, ps.zeros, ps.max_abs};
    if (slot0 >= 0) {
      slot_totals[static_cast<size_t>(slot0 + p.index)] = totals;
      return;
    }
    write_segment(out, p.segment, d, p.rows, totals, ps.acc);
    const idx_t finite = p.rows - ps.nonfinite;
    if (ps.max_abs == 0.f) {  // every finite row is sparse, and all-zero: its moments are 0
      out.sparse[p.segment] = finite;
      return;
    }
    const float threshold = sparse_threshold(ps.max_abs);
    out.sparse[p.segment] = count_below(s.rowmax, p.rows, threshold);
    if (out.sparse[p.segment] > 0) {  // accumulated apart: neighbouring segments' outputs share cache lines
      std::vector<double> m(static_cast<size_t>(d) + dd, 0.0);
      k.sparse_moments(x, p.r0, p.rows, s.rowmax, threshold, m.data(), m.data() + d);
      std::copy(m.begin(), m.begin() + d, out.sum_sparse + p.segment * d);
      double* g = out.gram_sparse + p.segment * static_cast<idx_t>(dd);
      std::copy(m.begin() + d, m.end(), g);
      mirror_upper(g, d);
    }
  });

  // segments of several pieces: pieces combined in order, then their sparse rows counted (and their moments
  // summed) in a second pass
  std::vector<Piece> recount;
  std::vector<double> combined(acc_n);
  std::vector<float> thresholds(static_cast<size_t>(segments), 0.f);
  for (idx_t j = 0; j < segments; ++j) {
    const idx_t slot0 = first_slot[static_cast<size_t>(j)];
    if (slot0 < 0) continue;
    const idx_t n_pieces = (stops[j] - starts[j] + kQualityPieceRows - 1) / kQualityPieceRows;
    SegmentTotals t;
    std::fill(combined.begin(), combined.end(), 0.0);
    for (idx_t p = 0; p < n_pieces; ++p) {
      const SegmentTotals& pt = slot_totals[static_cast<size_t>(slot0 + p)];
      t.nonfinite += pt.nonfinite;
      t.zeros += pt.zeros;
      t.max_abs = std::max(t.max_abs, pt.max_abs);
      const double* a = slot_acc.data() + static_cast<size_t>(slot0 + p) * acc_n;
      for (size_t e = 0; e < acc_n; ++e) combined[e] += a[e];
    }
    write_segment(out, j, d, stops[j] - starts[j], t, combined.data());
    if (t.max_abs == 0.f) {
      out.sparse[j] = out.n[j];
    } else {
      thresholds[static_cast<size_t>(j)] = sparse_threshold(t.max_abs);
      for (idx_t p = 0; p < n_pieces; ++p) {
        const idx_t r0 = starts[j] + p * kQualityPieceRows;
        recount.push_back({j, r0, std::min<idx_t>(kQualityPieceRows, stops[j] - r0), p});
      }
    }
  }
  if (recount.empty()) return;
  // per piece: its sparse count and moments (sum [d], upper-triangle gram [d, d]), added up in piece order
  const size_t moments = static_cast<size_t>(d) + dd;
  std::vector<idx_t> sparse(recount.size(), 0);
  std::vector<double> piece_moments(recount.size() * moments, 0.0);
  parallel_for(static_cast<idx_t>(recount.size()), threads, 1, [&](int t, idx_t i) {
    const Piece& p = recount[static_cast<size_t>(i)];
    const QualityScratch& s = scratch[t];
    const float threshold = thresholds[static_cast<size_t>(p.segment)];
    k.piece_rowmax(x, p.r0, p.rows, s);
    sparse[static_cast<size_t>(i)] = count_below(s.rowmax, p.rows, threshold);
    if (sparse[static_cast<size_t>(i)] > 0) {
      double* m = piece_moments.data() + static_cast<size_t>(i) * moments;
      k.sparse_moments(x, p.r0, p.rows, s.rowmax, threshold, m, m + d);
    }
  });
  for (size_t i = 0; i < recount.size(); ++i) {
    const idx_t j = recount[i].segment;
    out.sparse[j] += sparse[i];
    const double* m = piece_moments.data() + i * moments;
    for (int e = 0; e < d; ++e) out.sum_sparse[j * d + e] += m[e];
    for (size_t e = 0; e < dd; ++e) out.gram_sparse[j * static_cast<idx_t>(dd) + static_cast<idx_t>(e)] += m[d + e];
  }
  for (size_t i = 0; i < recount.size(); ++i)
    if (i + 1 == recount.size() || recount[i + 1].segment != recount[i].segment)
      mirror_upper(out.gram_sparse + recount[i].segment * static_cast<idx_t>(dd), d);
}

namespace {

// The shared setup of the two coefficient passes: pieces, workers, scratch.
struct CoefRun {
  std::vector<Piece> pieces;
  int threads = 1;
  std::unique_ptr<QualityArena> scratch;

  template <class Keep>
  CoefRun(const KernelsIn& x, const int64_t* starts, const int64_t* stops, idx_t segments, int n_components,
          int requested_threads, Keep&& keep) {
    const idx_t rows = split(starts, stops, segments, keep, pieces);
    threads = workers_for(rows, static_cast<idx_t>(pieces.size()), requested_threads);
    scratch = std::make_unique<QualityArena>(
        threads, [&](Slices& sl) { return carve_quality_scratch(sl, x.d, n_components, false); });
  }
  template <class Fn>
  void for_each_piece(Fn&& fn) const {
    parallel_for(static_cast<idx_t>(pieces.size()), threads, 1,
                 [&](int t, idx_t i) { fn(t, pieces[static_cast<size_t>(i)], (*scratch)[t]); });
  }
};

}  // namespace

void coef_range(const KernelsIn& x, const int64_t* starts, const int64_t* stops, idx_t segments, const double* mean,
                const double* basis, int n_components, bool scale_maxabs, double* lo, double* hi, int threads) {
  const QualityKernels& k = kernels();
  CoefRun run(x, starts, stops, segments, n_components, threads, [](idx_t) { return true; });
  CoefParams p;
  p.n_components = n_components;
  p.scale_maxabs = scale_maxabs;
  p.mean = mean;
  p.basis = basis;
  const size_t nc = static_cast<size_t>(n_components);
  std::vector<double> t_lo(static_cast<size_t>(run.threads) * nc, std::numeric_limits<double>::infinity());
  std::vector<double> t_hi(static_cast<size_t>(run.threads) * nc, -std::numeric_limits<double>::infinity());
  run.for_each_piece([&](int t, const Piece& piece, const QualityScratch& s) {
    k.coef_minmax(x, piece.r0, piece.rows, p, s, t_lo.data() + static_cast<size_t>(t) * nc,
                  t_hi.data() + static_cast<size_t>(t) * nc);
  });
  for (size_t c = 0; c < nc; ++c) {
    lo[c] = std::numeric_limits<double>::infinity();
    hi[c] = -std::numeric_limits<double>::infinity();
    for (int t = 0; t < run.threads; ++t) {
      lo[c] = std::min(lo[c], t_lo[static_cast<size_t>(t) * nc + c]);
      hi[c] = std::max(hi[c], t_hi[static_cast<size_t>(t) * nc + c]);
    }
  }
}

void coef_histograms(const KernelsIn& x, const int64_t* starts, const int64_t* stops, const int32_t* groups,
                     idx_t segments, int n_groups, const double* mean, const double* basis, int n_components,
                     const double* lo, const double* hi, int bins, bool scale_maxabs, int64_t* hist, int threads) {
  const QualityKernels& k = kernels();
  const size_t nc = static_cast<size_t>(n_components), per_group = nc * static_cast<size_t>(bins);
  std::fill(hist, hist + static_cast<size_t>(n_groups) * per_group, 0);
  CoefRun run(x, starts, stops, segments, n_components, threads, [&](idx_t j) { return groups[j] >= 0; });
  std::vector<double> inv_width(nc);
  for (size_t c = 0; c < nc; ++c) inv_width[c] = static_cast<double>(bins) / (hi[c] - lo[c]);
  CoefParams p;
  p.n_components = n_components;
  p.scale_maxabs = scale_maxabs;
  p.mean = mean;
  p.basis = basis;
  p.lo = lo;
  p.inv_width = inv_width.data();
  p.bins = bins;
  // per thread: the current piece's counts in four copies of per_group + 1 slots (uint32: a piece has at most
  // 2^18 rows; the extra slot collects skipped rows)
  const size_t copy = per_group + 1;
  std::vector<uint32_t> local(static_cast<size_t>(run.threads) * 4 * copy);
  run.for_each_piece([&](int t, const Piece& piece, const QualityScratch& s) {
    uint32_t* h = local.data() + static_cast<size_t>(t) * 4 * copy;
    std::fill(h, h + 4 * copy, 0u);
    k.coef_hist(x, piece.r0, piece.rows, p, s, h);
    int64_t* dst = hist + static_cast<size_t>(groups[piece.segment]) * per_group;
    // integer counts: the order in which pieces are added does not matter
#ifdef _OPENMP
#pragma omp critical(kernelatlas_quality_hist)
#endif
    for (size_t e = 0; e < per_group; ++e)
      dst[e] += static_cast<int64_t>(h[e]) + h[copy + e] + h[2 * copy + e] + h[3 * copy + e];
  });
}

double orthogonality(const KernelsIn& x, idx_t* count_out, int threads) {
  const QualityKernels& k = kernels();
  const idx_t c_out = x.rows, m = x.d;
  const idx_t mp = (m + 15) / 16 * 16;  // a multiple of every ISA's vector width
  // pass 1, per filter: finite or not, and 1 / its L2 norm (float64)
  std::vector<double> inv_norm(static_cast<size_t>(c_out));
  std::vector<uint8_t> finite(static_cast<size_t>(c_out));
  const int workers = workers_for(c_out * m, c_out, threads, kSerialRows * 16);
  const auto entry = [&](idx_t r, idx_t e) {
    const idx_t at = r * m + e;
    return x.dtype == DType::float16 ? static_cast<double>(half_to_float(static_cast<const uint16_t*>(x.data)[at]))
                                     : static_cast<double>(static_cast<const float*>(x.data)[at]);
  };
  parallel_for(c_out, workers, 16, [&](int, idx_t r) {
    double ss = 0.0;
    bool ok = true;
    for (idx_t e = 0; e < m; ++e) {
      const double w = entry(r, e);
      ok = ok && std::isfinite(w);
      ss += w * w;
    }
    finite[static_cast<size_t>(r)] = ok;
    inv_norm[static_cast<size_t>(r)] = ok && ss > 0.0 ? 1.0 / std::sqrt(ss) : 1.0;
  });
  std::vector<idx_t> keep;
  for (idx_t r = 0; r < c_out; ++r)
    if (finite[static_cast<size_t>(r)]) keep.push_back(r);
  const auto count = static_cast<idx_t>(keep.size());
  *count_out = count;
  if (count < 2) return std::numeric_limits<double>::quiet_NaN();
  // pass 2: the finite filters, normalised, as float32 rows of mp entries (zero padded, rows up to a tile)
  const idx_t rows = (count + 3) / 4 * 4;
  std::vector<float> u(static_cast<size_t>(rows * mp), 0.f);
  parallel_for(count, workers, 16, [&](int, idx_t i) {
    const idx_t r = keep[static_cast<size_t>(i)];
    const double s = inv_norm[static_cast<size_t>(r)];
    float* dst = u.data() + i * mp;
    for (idx_t e = 0; e < m; ++e) dst[e] = static_cast<float>(entry(r, e) * s);
  });
  // panels of 16 rows, each against every row from its first on; summed in panel order (any thread count)
  constexpr idx_t kPanel = 16;
  const idx_t panels = (rows + kPanel - 1) / kPanel;
  std::vector<double> part(static_cast<size_t>(panels), 0.0);
  // (threads only past ~2^24 FMAs, a few ms: waking a second worker for less measured slower on a busy machine)
  const int panel_workers = workers_for(count * count * m / 2, panels, threads, idx_t{1} << 24);
  parallel_for(panels, panel_workers, 1, [&](int, idx_t p) {
    part[static_cast<size_t>(p)] = k.orth_panel(u.data(), count, mp, p * kPanel, std::min(rows, (p + 1) * kPanel));
  });
  double total = 0.0;
  for (const double v : part) total += v;
  return 1.0 - total / (static_cast<double>(count) * static_cast<double>(count - 1));
}

int64_t label_counts(const int16_t* labels, const float* values, const int64_t* starts, const int64_t* stops,
                     idx_t segments, int n_labels, bool nan_is_dead, int64_t* counts, int threads) {
  const QualityKernels& k = kernels();
  const size_t width = static_cast<size_t>(n_labels) + 2;
  // work items: (segment, piece of <= kCountPiece rows), spread over the workers, each with its own table
  constexpr idx_t kCountPiece = 1 << 15;
  std::vector<std::pair<idx_t, idx_t>> items;  // (segment, first row)
  idx_t rows = 0;
  for (idx_t j = 0; j < segments; ++j) {
    for (idx_t r = starts[j]; r < stops[j]; r += kCountPiece) items.emplace_back(j, r);
    rows += stops[j] - starts[j];
  }
  const auto n_items = static_cast<idx_t>(items.size());
  threads = workers_for(rows, n_items, threads, 4 * kCountPiece);
  const size_t table = static_cast<size_t>(segments) * width;
  std::vector<int64_t> tables(static_cast<size_t>(threads) * table, 0);
  // static schedule: pieces are equal but for segment ends, and integer counts add up in any order
  parallel_for(n_items, threads, 0, [&](int t, idx_t i) {
    const auto [j, r] = items[static_cast<size_t>(i)];
    int64_t* row = tables.data() + static_cast<size_t>(t) * table + static_cast<size_t>(j) * width;
    k.count_labels(labels, values, r, std::min<idx_t>(stops[j], r + kCountPiece), n_labels, nan_is_dead, row);
  });
  int64_t bad = 0;
  for (idx_t j = 0; j < segments; ++j) {
    int64_t* out = counts + static_cast<size_t>(j) * width;
    std::fill(out, out + width, 0);
    for (int t = 0; t < threads; ++t) {
      const int64_t* row = tables.data() + static_cast<size_t>(t) * table + static_cast<size_t>(j) * width;
      for (size_t c = 0; c < width; ++c) out[c] += row[c];
    }
    int64_t counted = 0;
    for (size_t c = 0; c + 1 < width; ++c) counted += out[c];
    bad += (stops[j] - starts[j]) - counted;
  }
  return bad;
}

}  // namespace kernelatlas
