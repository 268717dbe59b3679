// normalize: centre every kernel and divide it by its L2 norm -- the first step of every other op, whose
// per-row part (normalize_column) they call.  The expressions and their order are those of the CPU engine's
// normalize_group (cpp/src/isa/tile_impl.h), one row at a time, so a GPU row is bit-identical to an AVX2 /
// AVX-512 one: power-of-two prescale by the exponent of max|w|, mean and centred sum of squares by FMA chains
// in entry order, then x / norm; dead, flat and non-finite kernels become zero rows (good = 0).
//
// Launch: one block per T rows, one thread per row.  Shared memory: xt [d][T + 1] floats.
// Phases: 0 coalesced load of the tile into xt (transposed), 1 each thread normalises its column and writes its
// norm, 2 coalesced store of the tile back to rows.
#pragma once
#include <cmath>

#include "common.cuh"

namespace kernelatlas {
namespace gpu {

// Centres and L2-normalises col[j * stride], j < d, in place.  good = 1 for a live, shaped, finite kernel,
// else 0 (and a zero column); norm = the centred norm, 0 for dead / flat kernels, NaN for non-finite ones.
KA_DEV_INLINE void normalize_column(float* col, int stride, int d, float min_abs, float* good, float* norm_out) {
  float amax = 0.f;
  bool finite = true;
  const float inf = bits_to_float(0x7f800000u);
  for (int j = 0; j < d; ++j) {
    const float ax = std::fabs(col[j * stride]);
    finite = finite && ax < inf;
    amax = fmax_s(amax, ax);
  }
  // 2^-e with e the (clamped) exponent of max|w|: field 254 - E of a normal float
  const int32_t e = clamp_i(exponent_field(amax), 1, 253);
  const float scale = from_exponent_field(254 - e);
  float mean = 0.f;
  for (int j = 0; j < d; ++j) mean = std::fma(col[j * stride], scale, mean);
  mean = 0.f - mean / static_cast<float>(d);  // minus the mean
  float ss = 0.f;
  for (int j = 0; j < d; ++j) {
    const float c = std::fma(col[j * stride], scale, mean);
    col[j * stride] = c;
    ss = std::fma(c, c, ss);
  }
  const float norm = std::sqrt(ss);  // of the scaled kernel
  const bool live = !(amax <= min_abs);
  const bool shaped = norm > kFlatRelTol * (amax * scale);
  const bool ok = finite && live && shaped;
  const float inv = ok ? 1.f / norm : 0.f;
  *good = ok ? 1.f : 0.f;
  *norm_out = finite ? (ok ? norm * from_exponent_field(e) : 0.f) : qnan_f();
  for (int j = 0; j < d; ++j) col[j * stride] = ok ? col[j * stride] * inv : 0.f;
}

struct NormalizeArgs {
  const void* x = nullptr;  // [rows, d] float32 or float16
  DType dtype = DType::float32;
  int64_t rows = 0;
  int d = 0;
  float min_abs = 0.f;
  float* normalized = nullptr;  // [rows, d]
  float* norms = nullptr;       // [rows]
};

struct NormalizeOp {
  using Args = NormalizeArgs;
  static constexpr int kPhases = 3;
  static int row_floats(const Args& a) { return a.d; }  // xt

  KA_DEV_INLINE static void phase(int p, const Args& a, const BlockCtx& b) {
    const int stride = row_stride(b.threads);
    const int rows = rows_in_block(a.rows, b);
    const int64_t r0 = b.block * b.threads;
    float* xt = b.smem;  // [d][stride]
    if (p == 0) {
      load_tile(a.x, a.dtype, r0, rows, a.d, b, xt);
    } else if (p == 1) {
      if (b.thread >= rows) return;
      float good, norm;
      normalize_column(xt + b.thread, stride, a.d, a.min_abs, &good, &norm);
      a.norms[r0 + b.thread] = norm;
    } else {
      // the tile back to rows: consecutive threads write consecutive entries
      for (int i = b.thread; i < rows * a.d; i += b.threads) {
        const int r = i / a.d, j = i - r * a.d;
        a.normalized[r0 * a.d + i] = xt[j * stride + r];
      }
    }
  }
};

}  // namespace gpu
}  // namespace kernelatlas

#if defined(__CUDACC__)
namespace kernelatlas {
namespace gpu {
// normalized [rows, d], norms [rows] from x [rows, d] (all device pointers), on `stream`.
inline void launch_normalize(const NormalizeArgs& a, cudaStream_t stream) {
  check_kernels_arg(a.x, a.dtype, a.rows, a.d);
  if (a.rows > 0 && (a.normalized == nullptr || a.norms == nullptr))
    throw std::invalid_argument("normalize: null output pointer");
  const int threads = kMaxThreads;
  launch_phased<NormalizeOp>(a, a.rows, threads, static_cast<int64_t>(sizeof(float)) * a.d * row_stride(threads),
                             stream);
}
}  // namespace gpu
}  // namespace kernelatlas
#endif
