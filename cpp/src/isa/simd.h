// Every per-ISA primitive the kernels use, with one meaning per ISA level, so that tile_impl.h and
// quality_impl.h are written once and hold no intrinsics.
// KA_ISA selects the level: 0 scalar (W = 1), 1 AVX2+FMA+F16C (W = 8), 2 AVX-512 F/BW/DQ/VL (W = 16).
// Every function is static inline inside the ISA's own namespace: no symbol is shared between variants.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if KA_ISA >= 1
#include <immintrin.h>
#endif

#include "kernelatlas/vecmath.h"

namespace kernelatlas {
namespace KA_NS {

#if KA_ISA == 2
constexpr int W = 16;
using vf = __m512;
using vi = __m512i;
using vm = __mmask16;
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vsqrt(vf a) { return _mm512_sqrt_ps(a); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vm vlt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline vm vle(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
static inline vm vgt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline vm vge(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
static inline vm mand(vm a, vm b) { return static_cast<vm>(a & b); }
static inline vm mnot(vm a) { return static_cast<vm>(~a); }
static inline vm mtrue() { return static_cast<vm>(0xffff); }
static inline vf vsel(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }
static inline vi iset(int32_t a) { return _mm512_set1_epi32(a); }
static inline vi iadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi imul(vi a, vi b) { return _mm512_mullo_epi32(a, b); }
static inline vi imin(vi a, vi b) { return _mm512_min_epi32(a, b); }
static inline vm ile(vi a, vi b) { return _mm512_cmple_epi32_mask(a, b); }
static inline vi isel(vm m, vi a, vi b) { return _mm512_mask_blend_epi32(m, b, a); }
static inline vi iinc(vm m, vi c) { return _mm512_mask_add_epi32(c, m, c, _mm512_set1_epi32(1)); }  // c + (m ? 1 : 0)
static inline void istore(int32_t* p, vi a) { _mm512_storeu_si512(p, a); }
static inline vf vgather(const float* base, vi idx) { return _mm512_i32gather_ps(idx, base, 4); }
static inline vi vround_i(vf a) { return _mm512_cvtps_epi32(a); }
static inline vf vfrom_i(vi a) { return _mm512_cvtepi32_ps(a); }
static inline vf vpow2i(vi n) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, iset(127)), 23)); }
static inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vi vexponent_field(vf a) {
  return _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(a), 23), _mm512_set1_epi32(0xff));
}
static inline vf vfrom_exponent_field(vi e) { return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)); }
static inline vi iclamp(vi a, int lo, int hi) { return _mm512_min_epi32(_mm512_max_epi32(a, iset(lo)), iset(hi)); }
static inline vi isub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline float load_half(const uint16_t* p) { return _cvtsh_ss(*p); }

// In-register transpose of a 16x16 block: r[i] holds row i on entry, column i on exit (64 shuffles).
static inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane k: column 4k + c of rows 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 p0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 p1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 q0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 q1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(p0, q0, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(p0, q0, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(p1, q1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(p1, q1, 0xdd);
  }
}

static inline vf load_part(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
static inline vf load_part(const uint16_t* p, int n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p));
}
static inline void store_part(float* p, vf a, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), a);
}
static inline void transpose(vf r[16]) { transpose16(r); }

// tbl[idx] for a table of `pad` (16, 32, 48 or 64) floats, by in-register permutes instead of a gather.
static inline vf vlookup(const float* tbl, int pad, vi idx) {
  const __m512 lo = pad == 16 ? _mm512_permutexvar_ps(idx, _mm512_loadu_ps(tbl))
                              : _mm512_permutex2var_ps(_mm512_loadu_ps(tbl), idx, _mm512_loadu_ps(tbl + 16));
  if (pad <= 32) return lo;
  const __m512 hi = _mm512_permutex2var_ps(_mm512_loadu_ps(tbl + 32), idx,
                                           pad == 64 ? _mm512_loadu_ps(tbl + 48) : _mm512_setzero_ps());
  return _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
}

#elif KA_ISA == 1
constexpr int W = 8;
using vf = __m256;
using vi = __m256i;
using vm = __m256;  // lanes of all ones / all zeros
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vsqrt(vf a) { return _mm256_sqrt_ps(a); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vm vlt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline vm vle(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
static inline vm vgt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
static inline vm vge(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
static inline vm mand(vm a, vm b) { return _mm256_and_ps(a, b); }
static inline vm mtrue() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
static inline vm mnot(vm a) { return _mm256_xor_ps(a, mtrue()); }
static inline vf vsel(vm m, vf a, vf b) { return _mm256_blendv_ps(b, a, m); }
static inline vi iset(int32_t a) { return _mm256_set1_epi32(a); }
static inline vi iadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi imul(vi a, vi b) { return _mm256_mullo_epi32(a, b); }
static inline vi imin(vi a, vi b) { return _mm256_min_epi32(a, b); }
static inline vm ile(vi a, vi b) { return mnot(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b))); }
static inline vi isel(vm m, vi a, vi b) { return _mm256_blendv_epi8(b, a, _mm256_castps_si256(m)); }
static inline vi iinc(vm m, vi c) { return _mm256_sub_epi32(c, _mm256_castps_si256(m)); }  // m's lanes are -1 or 0
static inline void istore(int32_t* p, vi a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
static inline vf vgather(const float* base, vi idx) { return _mm256_i32gather_ps(base, idx, 4); }
static inline vi vround_i(vf a) { return _mm256_cvtps_epi32(a); }
static inline vf vfrom_i(vi a) { return _mm256_cvtepi32_ps(a); }
static inline vf vpow2i(vi n) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, iset(127)), 23)); }
static inline float hsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float load_half(const uint16_t* p) { return _cvtsh_ss(*p); }
static inline vi vexponent_field(vf a) {
  return _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(a), 23), _mm256_set1_epi32(0xff));
}
static inline vf vfrom_exponent_field(vi e) { return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)); }
static inline vi iclamp(vi a, int lo, int hi) { return _mm256_min_epi32(_mm256_max_epi32(a, iset(lo)), iset(hi)); }
static inline vi isub(vi a, vi b) { return _mm256_sub_epi32(a, b); }

static inline __m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf load_part(const float* p, int n) { return _mm256_maskload_ps(p, lanes_below(n)); }
static inline vf load_part(const uint16_t* p, int n) {
  alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, sizeof(uint16_t) * static_cast<size_t>(n));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
}
static inline void store_part(float* p, vf a, int n) { _mm256_maskstore_ps(p, lanes_below(n), a); }
// In-register transpose of an 8x8 block: r[i] holds row i on entry, column i on exit.
static inline void transpose(vf r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

#else
constexpr int W = 1;
using vf = float;
using vi = int32_t;
using vm = bool;
static inline vf vset(float a) { return a; }
static inline vf vload(const float* p) { return *p; }
static inline void vstore(float* p, vf a) { *p = a; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vdiv(vf a, vf b) { return a / b; }
static inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
static inline vf vsqrt(vf a) { return std::sqrt(a); }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vabs(vf a) { return std::fabs(a); }
static inline vm vlt(vf a, vf b) { return a < b; }
static inline vm vle(vf a, vf b) { return a <= b; }
static inline vm vgt(vf a, vf b) { return a > b; }
static inline vm vge(vf a, vf b) { return a >= b; }
static inline vm mand(vm a, vm b) { return a && b; }
static inline vm mnot(vm a) { return !a; }
static inline vm mtrue() { return true; }
static inline vf vsel(vm m, vf a, vf b) { return m ? a : b; }
static inline vi iset(int32_t a) { return a; }
static inline vi iadd(vi a, vi b) { return a + b; }
static inline vi imul(vi a, vi b) { return a * b; }
static inline vi imin(vi a, vi b) { return a < b ? a : b; }
static inline vm ile(vi a, vi b) { return a <= b; }
static inline vi isel(vm m, vi a, vi b) { return m ? a : b; }
static inline vi iinc(vm m, vi c) { return m ? c + 1 : c; }
static inline void istore(int32_t* p, vi a) { *p = a; }
static inline vf vgather(const float* base, vi idx) { return base[idx]; }
static inline float hsum(vf a) { return a; }
static inline float load_half(const uint16_t* p) { return half_to_float(*p); }
static inline vi vexponent_field(vf a) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  return static_cast<vi>((bits >> 23) & 0xffu);
}
static inline vf vfrom_exponent_field(vi e) {
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
static inline vi iclamp(vi a, int lo, int hi) { return a < lo ? lo : (a > hi ? hi : a); }
static inline vi isub(vi a, vi b) { return a - b; }
#endif

// ---- |w| as integer bits: the max over a row is one integer max per entry, and NaN/Inf (exponent all ones)
// compare above every finite value, so "row is finite" is one compare of the row's max bits ----
constexpr int32_t kInfBits = 0x7f800000;
#if KA_ISA == 2
static inline vi abs_bits(vf a) { return _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)); }
static inline vi max_bits(vi a, vi b) { return _mm512_max_epi32(a, b); }  // sign bits are clear: signed max is fine
static inline vm bits_below(vi a, int32_t t) { return _mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(t)); }
static inline vm bits_zero(vi a) { return _mm512_testn_epi32_mask(a, a); }
static inline vf bits_float(vi a) { return _mm512_castsi512_ps(a); }
static inline vm lanes_live(int n) { return n >= W ? mtrue() : static_cast<vm>((1u << (n > 0 ? n : 0)) - 1u); }
static inline bool any(vm m) { return m != 0; }
static inline bool all(vm m) { return m == 0xffff; }
// p[0, W) += a, in float64
static inline void add_f64(double* p, vf a) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
  const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
  _mm512_storeu_pd(p + 8, _mm512_add_pd(_mm512_loadu_pd(p + 8), hi));
}
#elif KA_ISA == 1
static inline vi abs_bits(vf a) { return _mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7fffffff)); }
static inline vi max_bits(vi a, vi b) { return _mm256_max_epi32(a, b); }
static inline vm bits_below(vi a, int32_t t) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(t), a));
}
static inline vm bits_zero(vi a) { return _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_setzero_si256())); }
static inline vf bits_float(vi a) { return _mm256_castsi256_ps(a); }
static inline vm lanes_live(int n) { return _mm256_castsi256_ps(lanes_below(n)); }
static inline bool any(vm m) { return _mm256_movemask_ps(m) != 0; }
static inline bool all(vm m) { return _mm256_movemask_ps(m) == 0xff; }
static inline void add_f64(double* p, vf a) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
  _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo));
  _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4), hi));
}
#else
static inline vi abs_bits(vf a) {
  uint32_t b;
  std::memcpy(&b, &a, sizeof(b));
  return static_cast<vi>(b & 0x7fffffffu);
}
static inline vi max_bits(vi a, vi b) { return a > b ? a : b; }
static inline vm bits_below(vi a, int32_t t) { return a < t; }
static inline vm bits_zero(vi a) { return a == 0; }
static inline vf bits_float(vi a) {
  float f;
  std::memcpy(&f, &a, sizeof(f));
  return f;
}
static inline vm lanes_live(int n) { return n > 0; }
static inline bool any(vm m) { return m; }
static inline bool all(vm m) { return m; }
static inline void add_f64(double* p, vf a) { *p += static_cast<double>(a); }
#endif

static inline float hmax(vf a) {
  float lanes[W];
  vstore(lanes, a);
  float m = lanes[0];
  for (int i = 1; i < W; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

// ---- float64 vectors (WD lanes), for the PCA coefficients of the statistics kernels ----
#if KA_ISA == 2
constexpr int WD = 8;
using vd = __m512d;
static inline vd dset(double a) { return _mm512_set1_pd(a); }
static inline vd dload(const double* p) { return _mm512_loadu_pd(p); }
static inline void dstore(double* p, vd a) { _mm512_storeu_pd(p, a); }
static inline vd dfrom(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
static inline vd dadd(vd a, vd b) { return _mm512_add_pd(a, b); }
static inline vd dsub(vd a, vd b) { return _mm512_sub_pd(a, b); }
static inline vd dmul(vd a, vd b) { return _mm512_mul_pd(a, b); }
static inline vd dfma(vd a, vd b, vd c) { return _mm512_fmadd_pd(a, b, c); }
static inline vd dmax(vd a, vd b) { return _mm512_max_pd(a, b); }
static inline vd dmin(vd a, vd b) { return _mm512_min_pd(a, b); }
static inline void dstore_i32(int32_t* p, vd a) {  // truncation
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvttpd_epi32(a));
}
// a where rowmax[0, WD) is a number (a finite row), else fill
static inline vd dfinite_or(vd a, const float* rowmax, double fill) {
  const vd m = dfrom(rowmax);
  return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(m, m, _CMP_ORD_Q), _mm512_set1_pd(fill), a);
}
#elif KA_ISA == 1
constexpr int WD = 4;
using vd = __m256d;
static inline vd dset(double a) { return _mm256_set1_pd(a); }
static inline vd dload(const double* p) { return _mm256_loadu_pd(p); }
static inline void dstore(double* p, vd a) { _mm256_storeu_pd(p, a); }
static inline vd dfrom(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline vd dadd(vd a, vd b) { return _mm256_add_pd(a, b); }
static inline vd dsub(vd a, vd b) { return _mm256_sub_pd(a, b); }
static inline vd dmul(vd a, vd b) { return _mm256_mul_pd(a, b); }
static inline vd dfma(vd a, vd b, vd c) { return _mm256_fmadd_pd(a, b, c); }
static inline vd dmax(vd a, vd b) { return _mm256_max_pd(a, b); }
static inline vd dmin(vd a, vd b) { return _mm256_min_pd(a, b); }
static inline void dstore_i32(int32_t* p, vd a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvttpd_epi32(a));
}
static inline vd dfinite_or(vd a, const float* rowmax, double fill) {
  const vd m = dfrom(rowmax);
  return _mm256_blendv_pd(_mm256_set1_pd(fill), a, _mm256_cmp_pd(m, m, _CMP_ORD_Q));
}
#else
constexpr int WD = 1;
using vd = double;
static inline vd dset(double a) { return a; }
static inline vd dload(const double* p) { return *p; }
static inline void dstore(double* p, vd a) { *p = a; }
static inline vd dfrom(const float* p) { return static_cast<double>(*p); }
static inline vd dadd(vd a, vd b) { return a + b; }
static inline vd dsub(vd a, vd b) { return a - b; }
static inline vd dmul(vd a, vd b) { return a * b; }
static inline vd dfma(vd a, vd b, vd c) { return std::fma(a, b, c); }
static inline vd dmax(vd a, vd b) { return a > b ? a : b; }
static inline vd dmin(vd a, vd b) { return a < b ? a : b; }
static inline void dstore_i32(int32_t* p, vd a) { *p = static_cast<int32_t>(a); }
static inline vd dfinite_or(vd a, const float* rowmax, double fill) { return *rowmax == *rowmax ? a : fill; }
#endif

#if KA_ISA == 2
// The 3x3 fp16 corpus case: 16 rows of 9 halves (288 contiguous bytes) -> 9 columns by word permutes instead of
// a 16x16 float transpose.  Output k holds entries 2k (words 0-15, one per row) and 2k + 1 (words 16-31); each
// word comes from one of three windows of the input (halves [0, 64), [64, 128), [128, 144)), merged by masks.
struct F16x9Permutes {
  uint16_t idx[5][32];
  uint32_t from64[5];  // words whose source index is >= 64
  uint32_t from128[5];  // ... >= 128
};
static constexpr F16x9Permutes make_f16x9_permutes() {
  F16x9Permutes t{};
  for (int k = 0; k < 5; ++k) {
    for (int w = 0; w < 32; ++w) {
      int entry = 2 * k + (w >= 16 ? 1 : 0);
      if (entry > 8) entry = 8;  // k = 4: the upper half is unused
      const int src = 9 * (w & 15) + entry;
      t.idx[k][w] = static_cast<uint16_t>(src);
      if (src >= 64) t.from64[k] |= 1u << w;
      if (src >= 128) t.from128[k] |= 1u << w;
    }
  }
  return t;
}
static constexpr F16x9Permutes kF16x9 = make_f16x9_permutes();

// Also returns the rows' max|w| as fp32 bits (what the generic path computes from the columns), taken in the
// fp16 domain: |h| as 16-bit integers orders like the values, NaN/Inf above all, and converts exactly.
static inline vi load16_f16x9(const uint16_t* p, vf col[W]) {
  const __m512i a0 = _mm512_loadu_si512(p), a1 = _mm512_loadu_si512(p + 32);
  const __m512i a2 = _mm512_loadu_si512(p + 64), a3 = _mm512_loadu_si512(p + 96);
  const __m512i a4 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128)));
  const __m512i abs_mask = _mm512_set1_epi16(0x7fff);
  __m512i mh = _mm512_setzero_si512();
#pragma GCC unroll 5
  for (int k = 0; k < 5; ++k) {
    const __m512i idx = _mm512_loadu_si512(kF16x9.idx[k]);
    // permutes read only the index bits they need: 6 for the two-table forms, 5 for the one-table form
    __m512i w = _mm512_permutex2var_epi16(a0, idx, a1);
    w = _mm512_mask_blend_epi16(kF16x9.from64[k], w, _mm512_permutex2var_epi16(a2, idx, a3));
    w = _mm512_mask_blend_epi16(kF16x9.from128[k], w, _mm512_permutexvar_epi16(idx, a4));
    mh = _mm512_max_epu16(mh, _mm512_and_si512(w, abs_mask));  // k = 4: the upper half repeats entry 8
    col[2 * k] = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
    if (k < 4) col[2 * k + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
  }
  const __m256i m16 = _mm256_max_epu16(_mm512_castsi512_si256(mh), _mm512_extracti64x4_epi64(mh, 1));
  return _mm512_castps_si512(_mm512_cvtph_ps(m16));
}
#endif

// ---- memory hints and whole-vector fp16 loads ----
// Prefetch into L1 (every level: a hint with no effect on the results).
static inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
#if KA_ISA == 1
// W halves from p, converted (the caller guarantees W readable halves; AVX2 has no masked 16-bit load).
static inline vf load_half_vec(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// ---- transcendental functions, vectorised (the scalar level uses libm, which is the reference) ----
#if KA_ISA >= 1
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (error < 1e-8 relative).
static inline vf vexp(vf x) {
  x = vmin(vmax(x, vset(-87.3f)), vset(88.3f));
  const vi n = vround_i(vmul(x, vset(1.44269504088896341f)));
  const vf nf = vfrom_i(n);
  vf r = vfma(nf, vset(-0.693359375f), x);
  r = vfma(nf, vset(2.12194440e-4f), r);
  vf p = vset(1.f / 5040.f);
  p = vfma(p, r, vset(1.f / 720.f));
  p = vfma(p, r, vset(1.f / 120.f));
  p = vfma(p, r, vset(1.f / 24.f));
  p = vfma(p, r, vset(1.f / 6.f));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.f));
  p = vfma(p, r, vset(1.f));
  return vmul(p, vpow2i(n));
}
static inline vf vsigmoid(vf x) { return vdiv(vset(1.f), vadd(vset(1.f), vexp(vsub(vset(0.f), x)))); }
// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); absolute error ~1e-7 near 0, which is what matters downstream.
static inline vf vtanh(vf x) {
  const vf ax = vabs(x);
  const vf t = vsub(vset(1.f), vdiv(vset(2.f), vadd(vexp(vadd(ax, ax)), vset(1.f))));
  return vsel(vlt(x, vset(0.f)), vsub(vset(0.f), t), t);
}
// erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (erf = +-1 to fp32 beyond), a rational minimax form.
static inline vf verf(vf x) {
  x = vmin(vmax(x, vset(-4.f)), vset(4.f));
  const vf x2 = vmul(x, x);
  vf p = vset(-2.72614225801306e-10f);
  p = vfma(p, x2, vset(2.77068142495902e-08f));
  p = vfma(p, x2, vset(-2.10102402082508e-06f));
  p = vfma(p, x2, vset(-5.69250639462346e-05f));
  p = vfma(p, x2, vset(-7.34990630326855e-04f));
  p = vfma(p, x2, vset(-2.95459980854025e-03f));
  p = vfma(p, x2, vset(-1.60960333262415e-02f));
  p = vmul(p, x);
  vf q = vset(-1.45660718464996e-05f);
  q = vfma(q, x2, vset(-2.13374055278905e-04f));
  q = vfma(q, x2, vset(-1.68282697438203e-03f));
  q = vfma(q, x2, vset(-7.37332916720468e-03f));
  q = vfma(q, x2, vset(-1.42647390514189e-02f));
  return vdiv(p, q);
}
#else
static inline vf vexp(vf x) { return std::exp(x); }
static inline vf vsigmoid(vf x) { return 1.f / (1.f + std::exp(-x)); }
static inline vf vtanh(vf x) { return std::tanh(x); }
static inline vf verf(vf x) { return std::erf(x); }
#endif

static inline vf vactivate(Activation act, vf x) {
  switch (act) {
    case Activation::identity: return x;
    case Activation::relu: return vmax(x, vset(0.f));
    case Activation::sigmoid: return vsigmoid(x);
    case Activation::tanh: return vtanh(x);
    case Activation::gelu: return vmul(vmul(vset(0.5f), x), vadd(vset(1.f), verf(vmul(x, vset(0.70710678118654752f)))));
    case Activation::gelu_tanh: {
      const vf inner = vmul(vset(0.7978845608028654f), vfma(vmul(vset(0.044715f), vmul(x, x)), x, x));
      return vmul(vmul(vset(0.5f), x), vadd(vset(1.f), vtanh(inner)));
    }
  }
  return x;
}

}  // namespace KA_NS
}  // namespace kernelatlas
