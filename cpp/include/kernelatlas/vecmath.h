// Per-value math shared by every backend: the scalar CPU path, the reference semantics the SIMD paths must
// match, and (later) the CUDA kernels.  Everything is inline with internal linkage so that a copy compiled
// with AVX-512 flags can never be picked by the linker for the scalar path.
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

}  // namespace
}  // namespace kernelatlas
