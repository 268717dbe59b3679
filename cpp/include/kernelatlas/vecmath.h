// Per-value math shared by every backend: the scalar CPU path, the reference semantics the SIMD paths must
// match, and the CUDA kernels (cuda/ops/*.cuh, which also run on the host in the CPU harness).  Everything is inline
// with internal linkage so that a copy compiled with AVX-512 flags can never be picked by the linker for the scalar
// path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernelatlas/types.h"

#if defined(__CUDACC__)
#define KA_HD __host__ __device__
#else
#define KA_HD
#endif

namespace kernelatlas {
namespace {

// A kernel whose centred L2 norm is at most kFlatRelTol * max|w| carries no pattern above fp32 rounding of
// its mean (a constant kernel): it is treated like an all-zero kernel (zero row, norm 0, label -1).
constexpr float kFlatRelTol = 1e-5f;

KA_HD inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  uint32_t bits;
  if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// ---- scalar forms of the SIMD paths' math (cpp/src/isa/simd.h, KA_ISA >= 1), for the CUDA kernels ----
// The same constants and the same operations in the same order, each rounded once (callers compile them with
// FMA contraction off: nvcc -fmad=false, the host compiler -ffp-contract=off), so that a GPU kernel gives the
// AVX2 / AVX-512 engine's values bit for bit.  The scalar CPU path uses libm instead (its reference).

// float bits <-> float, on either side (memcpy is fine in device code and compiles to a move).
KA_HD inline uint32_t float_bits(float a) {
  uint32_t b;
  std::memcpy(&b, &a, sizeof(b));
  return b;
}
KA_HD inline float bits_to_float(uint32_t b) {
  float a;
  std::memcpy(&a, &b, sizeof(a));
  return a;
}

// Exponent field (0..255) of a float and the power of two with a given field: the normalisation prescale.
KA_HD inline int32_t exponent_field(float a) { return static_cast<int32_t>((float_bits(a) >> 23) & 0xffu); }
KA_HD inline float from_exponent_field(int32_t e) { return bits_to_float(static_cast<uint32_t>(e) << 23); }
KA_HD inline int32_t clamp_i(int32_t a, int32_t lo, int32_t hi) { return a < lo ? lo : (a > hi ? hi : a); }

// Round to nearest, ties to even (what _mm*_cvtps_epi32 does in the default rounding mode).
KA_HD inline int32_t round_to_int(float a) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(a);
#else
  return static_cast<int32_t>(std::nearbyint(a));
#endif
}

KA_HD inline float fmin_s(float a, float b) { return a < b ? a : b; }
KA_HD inline float fmax_s(float a, float b) { return a > b ? a : b; }

// exp: Cody-Waite reduction x = n ln2 + r, degree-7 Taylor polynomial (simd.h vexp).
KA_HD inline float exp_poly(float x) {
  x = fmin_s(fmax_s(x, -87.3f), 88.3f);
  const int32_t n = round_to_int(x * 1.44269504088896341f);
  const float nf = static_cast<float>(n);
  float r = std::fma(nf, -0.693359375f, x);
  r = std::fma(nf, 2.12194440e-4f, r);
  float p = 1.f / 5040.f;
  p = std::fma(p, r, 1.f / 720.f);
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  return p * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
}
KA_HD inline float sigmoid_poly(float x) { return 1.f / (1.f + exp_poly(0.f - x)); }
KA_HD inline float tanh_poly(float x) {
  const float ax = std::fabs(x);
  const float t = 1.f - 2.f / (exp_poly(ax + ax) + 1.f);
  return x < 0.f ? 0.f - t : t;
}
KA_HD inline float erf_poly(float x) {
  x = fmin_s(fmax_s(x, -4.f), 4.f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = std::fma(p, x2, 2.77068142495902e-08f);
  p = std::fma(p, x2, -2.10102402082508e-06f);
  p = std::fma(p, x2, -5.69250639462346e-05f);
  p = std::fma(p, x2, -7.34990630326855e-04f);
  p = std::fma(p, x2, -2.95459980854025e-03f);
  p = std::fma(p, x2, -1.60960333262415e-02f);
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = std::fma(q, x2, -2.13374055278905e-04f);
  q = std::fma(q, x2, -1.68282697438203e-03f);
  q = std::fma(q, x2, -7.37332916720468e-03f);
  q = std::fma(q, x2, -1.42647390514189e-02f);
  return p / q;
}

// simd.h vactivate, one value.  relu is max(x, 0) with 0 for -0 and NaN, as the SIMD max returns it.
KA_HD inline float activate_poly(Activation act, float x) {
  switch (act) {
    case Activation::identity: return x;
    case Activation::relu: return x > 0.f ? x : 0.f;
    case Activation::sigmoid: return sigmoid_poly(x);
    case Activation::tanh: return tanh_poly(x);
    case Activation::gelu: return (0.5f * x) * (1.f + erf_poly(x * 0.70710678118654752f));
    case Activation::gelu_tanh: {
      const float inner = 0.7978845608028654f * std::fma(0.044715f * (x * x), x, x);
      return (0.5f * x) * (1.f + tanh_poly(inner));
    }
  }
  return x;
}

// The label of a code on the cluster intervals [lo, hi) (the last closed at hi): the last interval holding it,
// -1 when none does, 0 for every code when there are no intervals (tile_impl.h assign_entry).
KA_HD inline int32_t interval_label(float z, int32_t n_int, const float* lo, const float* hi) {
  int32_t label = n_int == 0 ? 0 : -1;
  for (int32_t i = 0; i < n_int; ++i) {
    const bool hi_ok = i == n_int - 1 ? z <= hi[i] : z < hi[i];
    if (z >= lo[i] && hi_ok) label = i;
  }
  return label;
}

// The segment of a code in a sorted breakpoint table t [n_seg - 1]: the number of breakpoints <= z, by binary
// search (the count the CPU paths take by counting or by their own binary search; the table is sorted).
KA_HD inline int32_t segment_of(float z, int32_t n_seg, const float* t) {
  int32_t lo = 0, hi = n_seg - 1;  // answer in [lo, hi]
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;  // is t[mid - 1] <= z?
    if (z >= t[mid - 1])
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace
}  // namespace kernelatlas
