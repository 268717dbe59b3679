// The CPU engine's drivers: choose the ISA's tile kernels once per call, then run them over row tiles.
#include "kernelatlas/engine.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#include "isa_registry.h"
#include "parallel.h"
#include "tile_kernels.h"

namespace kernelatlas {
namespace {

const TileKernels& kernels() { return *active_variant().tile; }

void check_precision(Precision precision) {
  std::string why;
  if (precision == Precision::bf16 && !bf16_available(&why))
    throw std::invalid_argument("precision='bf16' is not available: " + why + "; use precision='fp32'");
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
  // layer buffers of kMaxDim rows: normalize_entry stages its output rows in buf0
  for_each_tile(x.rows, k.tile_rows, kMaxDim, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.normalize(x, r0, rows, min_abs, normalized + r0 * x.d, norms + r0, s);
  });
}

void encode(const ModelView& m, const KernelsIn& x, float min_abs, float* codes, int threads, Precision precision) {
  check_precision(precision);
  const TileKernels& k = kernels();
  for_each_tile(x.rows, k.tile_rows, m.max_width_pad, threads, [&](idx_t r0, int rows, const TileScratch& s) {
    k.encode(m, x, r0, rows, min_abs, precision, codes + r0, s);
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
    k.encode(m, x, r0, rows, min_abs, Precision::fp32, codes, s);
    k.decode(m, codes, rows, decoded + r0 * m.d, s);
  });
}

void assign(const ModelView& m, const KernelsIn& x, float threshold, float min_abs, bool use_segments, int16_t* labels,
            float* scores, float* codes, int threads, Precision precision, float recheck_code, float recheck_score) {
  check_precision(precision);
  const TileKernels& k = kernels();
  AssignParams p;
  p.precision = precision;
  p.recheck_code = recheck_code;
  p.recheck_score = recheck_score;
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
  // one probe per thread, all at once (static schedule: one item each)
  const auto t0 = std::chrono::steady_clock::now();
  parallel_for(threads, threads, 0, [&](int, idx_t) { sink = sink + k.fma_probe(iters); });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(iters) * k.fma_flops_per_iter * threads / dt * 1e-9;
}

}  // namespace kernelatlas
