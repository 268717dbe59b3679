// The CPU engine's drivers: choose the ISA's tile kernels once per call, then run them over row tiles.
#include "kernelatlas/engine.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "parallel.h"
#include "tile_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kernelatlas {
namespace {

const TileKernels& kernels() {
  switch (active_isa()) {
    case Isa::avx512: return tile_kernels_avx512();
    case Isa::avx2: return tile_kernels_avx2();
    case Isa::scalar: break;
  }
  return tile_kernels_scalar();
}

}  // namespace

int default_threads() { return resolve_threads(0); }

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

void normalize(const KernelsIn& x, float min_abs, float* normalized, float* norms, int threads) {
  const TileKernels& k = kernels();
  for_each_tile(x.rows, k.tile_rows, 0, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.normalize(x, r0, rows, min_abs, normalized + r0 * x.d, norms + r0, s);
  });
}

void encode(const ModelView& m, const KernelsIn& x, float min_abs, float* codes, int threads) {
  const TileKernels& k = kernels();
  for_each_tile(x.rows, k.tile_rows, m.max_width_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.encode(m, x, r0, rows, min_abs, codes + r0, s);
  });
}

void decode(const ModelView& m, const float* codes, idx_t n, float* decoded, int threads) {
  const TileKernels& k = kernels();
  for_each_tile(n, k.tile_rows, m.max_width_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.decode(m, codes + r0, rows, decoded + r0 * m.d, s);
  });
}

void reconstruct(const ModelView& m, const KernelsIn& x, float min_abs, float* decoded, int threads) {
  const TileKernels& k = kernels();
  for_each_tile(x.rows, k.tile_rows, m.max_width_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    float codes[256];
    k.encode(m, x, r0, rows, min_abs, codes, s);
    k.decode(m, codes, rows, decoded + r0 * m.d, s);
  });
}

void assign(const ModelView& m, const KernelsIn& x, float threshold, float min_abs, bool use_segments,
            int16_t* labels, float* scores, float* codes, int threads) {
  const TileKernels& k = kernels();
  AssignParams p;
  p.threshold = threshold;
  p.min_abs = min_abs;
  p.use_segments = use_segments;
  for_each_tile(x.rows, k.tile_rows, m.max_width_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.assign(m, x, r0, rows, p, labels + r0, scores + r0, codes + r0, s);
  });
}

void assign_prototypes(const PrototypeView& p, const KernelsIn& x, float threshold, float min_abs, int16_t* labels,
                       float* scores, int threads) {
  const TileKernels& k = kernels();
  for_each_tile(x.rows, k.tile_rows, p.layer.out_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.assign_prototypes(p, x, r0, rows, threshold, min_abs, labels + r0, scores + r0, s);
  });
}

namespace {

// Rows of one segment, in blocks that stay in L1: with few labels, one vectorised compare-and-count pass per
// label value over the block beats a scattered histogram (whose increments serialise on repeated labels).
constexpr idx_t kCountBlock = 4096;
constexpr int kFewLabels = 32;

// Cloned per ISA by the compiler (ifunc): a statistics helper, not worth a place in the tile-kernel table.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void count_segment(const int16_t* labels, const float* values, idx_t a, idx_t b, int n_labels, bool nan_is_dead,
                   int64_t* row) {
  const int width = n_labels + 2;
  int64_t dead = 0;
  for (idx_t r0 = a; r0 < b; r0 += kCountBlock) {
    const idx_t r1 = std::min(b, r0 + kCountBlock);
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

}  // namespace

int64_t label_counts(const int16_t* labels, const float* values, const int64_t* starts, const int64_t* stops,
                     idx_t segments, int n_labels, bool nan_is_dead, int64_t* counts, int threads) {
  const size_t width = static_cast<size_t>(n_labels) + 2;
  // work items: (segment, piece of <= kCountPiece rows), spread over the threads, each with its own table
  constexpr idx_t kCountPiece = 1 << 15;
  std::vector<std::pair<idx_t, idx_t>> items;  // (segment, first row)
  idx_t rows = 0;
  for (idx_t j = 0; j < segments; ++j) {
    for (idx_t r = starts[j]; r < stops[j]; r += kCountPiece) items.emplace_back(j, r);
    rows += stops[j] - starts[j];
  }
  threads = rows < 4 * kCountPiece ? 1 : std::max(1, std::min(resolve_threads(threads), static_cast<int>(items.size())));
  std::vector<int64_t> tables(static_cast<size_t>(threads) * static_cast<size_t>(segments) * width, 0);
  const auto run = [&](int t, idx_t i) {
    const auto [j, r] = items[static_cast<size_t>(i)];
    int64_t* row = tables.data() + (static_cast<size_t>(t) * static_cast<size_t>(segments) + static_cast<size_t>(j)) * width;
    count_segment(labels, values, r, std::min<idx_t>(stops[j], r + kCountPiece), n_labels, nan_is_dead, row);
  };
  const auto n_items = static_cast<idx_t>(items.size());
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (idx_t i = 0; i < n_items; ++i) run(omp_get_thread_num(), i);
  } else
#endif
  {
    for (idx_t i = 0; i < n_items; ++i) run(0, i);
  }
  int64_t bad = 0;
  for (idx_t j = 0; j < segments; ++j) {
    int64_t* out = counts + static_cast<size_t>(j) * width;
    std::fill(out, out + width, 0);
    for (int t = 0; t < threads; ++t) {
      const int64_t* row = tables.data() + (static_cast<size_t>(t) * static_cast<size_t>(segments) + static_cast<size_t>(j)) * width;
      for (size_t c = 0; c < width; ++c) out[c] += row[c];
    }
    int64_t counted = 0;
    for (size_t c = 0; c + 1 < width; ++c) counted += out[c];
    bad += (stops[j] - starts[j]) - counted;
  }
  return bad;
}

double fma_peak_gflops(double seconds, int threads) {
  const TileKernels& k = kernels();
  threads = resolve_threads(threads);
  // calibrate the iteration count on one thread, then run it on every thread at once
  int64_t iters = 1 << 16;
  volatile float sink = 0.f;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + k.fma_probe(iters);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0.05 || iters > (int64_t{1} << 40)) {
      iters = static_cast<int64_t>(iters * (seconds / std::max(dt, 1e-9)));
      break;
    }
    iters *= 4;
  }
  const auto t0 = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  { sink = sink + k.fma_probe(iters); }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(iters) * k.fma_flops_per_iter * threads / dt * 1e-9;
}

}  // namespace kernelatlas
