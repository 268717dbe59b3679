// The engine's one parallel-for: tiles of rows spread over OpenMP threads, each thread with its own scratch,
// a serial path for small inputs, and exceptions gathered from workers and rethrown once by the caller.
#pragma once
#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernelatlas/types.h"
#include "tile_kernels.h"

namespace kernelatlas {

// Below this many rows the threads cost more than they save.
constexpr idx_t kSerialRows = 4096;

// Per-thread scratch for the tile kernels, 64-byte aligned.
class TileScratchOwner {
 public:
  TileScratchOwner(int tile_rows, int max_width_pad) {
    const size_t t = static_cast<size_t>(tile_rows);
    const size_t wide = static_cast<size_t>(std::max(max_width_pad, 1));
    const size_t sizes[4] = {kMaxDim * t, wide * t, wide * t, 8 * t};
    size_t total = 0;
    for (size_t s : sizes) total += (s + 15) / 16 * 16;
    mem_.reset(new float[total + 16]());
    float* p = mem_.get();
    p += (16 - (reinterpret_cast<uintptr_t>(p) / sizeof(float)) % 16) % 16;
    float** slots[4] = {&s_.xt, &s_.buf0, &s_.buf1, &s_.aux};
    for (int i = 0; i < 4; ++i) {
      *slots[i] = p;
      p += (sizes[i] + 15) / 16 * 16;
    }
  }
  const TileScratch& get() const { return s_; }

 private:
  std::unique_ptr<float[]> mem_;
  TileScratch s_{};
};

inline int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// fn(row_begin, rows, scratch) for every tile of [0, n).
template <class Fn>
void for_each_tile(idx_t n, int tile_rows, int max_width_pad, int threads, Fn&& fn) {
  if (n <= 0) return;
  const idx_t n_tiles = (n + tile_rows - 1) / tile_rows;
  const auto run_tile = [&](idx_t t, const TileScratch& s) {
    const idx_t r0 = t * tile_rows;
    fn(r0, static_cast<int>(std::min<idx_t>(tile_rows, n - r0)), s);
  };
  threads = resolve_threads(threads);
  if (n < kSerialRows || threads <= 1) {
    TileScratchOwner scratch(tile_rows, max_width_pad);
    for (idx_t t = 0; t < n_tiles; ++t) run_tile(t, scratch.get());
    return;
  }
#ifdef _OPENMP
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const auto record = [&] {
#pragma omp critical(kernelatlas_error)
    if (!error) error = std::current_exception();
    failed = true;
  };
#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<TileScratchOwner> scratch;
    try {
      scratch = std::make_unique<TileScratchOwner>(tile_rows, max_width_pad);
    } catch (...) {
      record();
    }
    // every thread reaches the loop (and its barrier) even after a failure; failed threads skip the work
#pragma omp for schedule(dynamic, 16)
    for (idx_t t = 0; t < n_tiles; ++t) {
      if (failed.load(std::memory_order_relaxed) || !scratch) continue;
      try {
        run_tile(t, scratch->get());
      } catch (...) {
        record();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

}  // namespace kernelatlas
