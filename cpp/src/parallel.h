// The engine's one parallel-for and its one scratch arena, used by every kernel driver (engine.cpp,
// quality.cpp): work items spread over OpenMP threads, a serial path for small inputs, per-worker scratch
// allocated before the threads start, and an exception thrown by any worker caught there and rethrown once on
// the calling thread (STYLE.md, principle 4) -- never std::terminate from inside an OpenMP region.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
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

inline int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// Workers for `items` work items covering `rows` rows: 1 below min_rows (or for a single item), else the
// requested threads (0: all), never more than there are items.
inline int workers_for(idx_t rows, idx_t items, int threads, idx_t min_rows = kSerialRows) {
  if (rows < min_rows || items < 2) return 1;
  return static_cast<int>(std::max<idx_t>(1, std::min<idx_t>(resolve_threads(threads), items)));
}

// body(worker, item) for every item in [0, n), worker in [0, workers).  chunk > 0: dynamic scheduling in
// chunks of that many items; chunk == 0: static, one contiguous share per worker.  After a worker throws, the
// remaining items are skipped; the first exception is rethrown here once every worker has stopped.
template <class Body>
void parallel_for(idx_t n, int workers, int chunk, Body&& body) {
  if (n <= 0) return;
#ifdef _OPENMP
  if (workers > 1) {
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    const auto run = [&](idx_t i) {
      if (failed.load(std::memory_order_relaxed)) return;
      try {
        body(omp_get_thread_num(), i);
      } catch (...) {
#pragma omp critical(kernelatlas_parallel_error)
        if (!error) error = std::current_exception();
        failed = true;
      }
    };
    if (chunk > 0) {
#pragma omp parallel for num_threads(workers) schedule(dynamic, chunk)
      for (idx_t i = 0; i < n; ++i) run(i);
    } else {
#pragma omp parallel for num_threads(workers) schedule(static)
      for (idx_t i = 0; i < n; ++i) run(i);
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#else
  (void)workers;
  (void)chunk;
#endif
  for (idx_t i = 0; i < n; ++i) body(0, i);
}

// Carves 64-byte aligned slices out of one block; with a null base it only measures (bytes()).
class Slices {
 public:
  explicit Slices(unsigned char* base = nullptr) : base_(base) {}
  template <class T>
  T* take(size_t count) {
    T* out = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += (count * sizeof(T) + 63) / 64 * 64;
    return out;
  }
  size_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  size_t used_ = 0;
};

// Per-worker scratch of type View: one zeroed, 64-byte aligned block per worker, carved by
// carve(Slices&) -> View (called once to measure, then once per worker).  Allocated on the calling thread,
// before parallel_for starts, so that running out of memory is an ordinary exception there.
template <class View>
class ScratchArena {
 public:
  template <class Carve>
  ScratchArena(int workers, Carve&& carve) {
    Slices measure;
    carve(measure);
    const size_t stride = std::max<size_t>(measure.bytes(), 64);
    mem_.reset(new unsigned char[stride * static_cast<size_t>(workers) + 64]());
    unsigned char* p = mem_.get();
    p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
    for (int w = 0; w < workers; ++w) {
      Slices s(p + stride * static_cast<size_t>(w));
      views_.push_back(carve(s));
    }
  }
  const View& operator[](int worker) const { return views_[static_cast<size_t>(worker)]; }

 private:
  std::unique_ptr<unsigned char[]> mem_;
  std::vector<View> views_;
};

// The tile kernels' scratch (tile_kernels.h) for tiles of tile_rows rows and layers up to max_width_pad wide.
inline TileScratch carve_tile_scratch(Slices& s, int tile_rows, int max_width_pad) {
  const size_t t = static_cast<size_t>(tile_rows);
  const size_t wide = static_cast<size_t>(std::max(max_width_pad, 1));
  TileScratch out;
  out.xt = s.take<float>(kMaxDim * t);
  out.buf0 = s.take<float>(wide * t);
  out.buf1 = s.take<float>(wide * t);
  out.aux = s.take<float>(8 * t);
  return out;
}

// fn(row_begin, rows, scratch) for every tile of [0, n), tiles spread over the workers.
template <class Fn>
void for_each_tile(idx_t n, int tile_rows, int max_width_pad, int threads, Fn&& fn) {
  if (n <= 0) return;
  const idx_t n_tiles = (n + tile_rows - 1) / tile_rows;
  const int workers = workers_for(n, n_tiles, threads);
  const ScratchArena<TileScratch> scratch(workers,
                                          [&](Slices& s) { return carve_tile_scratch(s, tile_rows, max_width_pad); });
  parallel_for(n_tiles, workers, 16, [&](int worker, idx_t t) {
    const idx_t r0 = t * tile_rows;
    fn(r0, static_cast<int>(std::min<idx_t>(tile_rows, n - r0)), scratch[worker]);
  });
}

}  // namespace kernelatlas
