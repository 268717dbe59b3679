// tensor_core: the opt-in TF32 path (precision='tf32') for the first encoder layer of encode and assign -- the
// layer with the most multiply-adds per row (d x width), computed by a warp with tensor-core mma instead of
// one FMA chain per thread.  Not exact: inputs and weights are rounded to TF32 (10-bit mantissa, cvt.rna), the
// products are exact and summed in fp32 in the tensor core's own order.  Every other layer, the decode and the
// cosine stay the exact fp32 path, so the only difference from device='cpu' is the first layer's rounding;
// the label agreement with fp32 is measured (tests/test_cuda_harness.py on the harness's emulation,
// tests/gpu/ and benchmarks/gpu_bench.py on a device; BENCHMARKS.md "GPU").
//
// One warp computes its 32 rows' first layer: rows are the mma's M (two 16-row tiles), inputs its K (padded to
// 8 with zeros), units its N.  The CPU packing of a layer, w [out_pad / 8][in][8], is the B operand as it is:
// panel ob holds the k x n tile of units ob..ob+7.  Accumulators start at the bias, as the exact path does.
//
// The harness: mma.sync is a warp-wide instruction that no thread can run alone, so the warp phase is written
// over kLanesPerCall lanes: 1 on the device (each thread its own lane), 32 in the CPU harness, where one call
// (the warp's lane 0) runs the whole warp and mma_tf32 multiplies the fragments the 32 lanes gathered, placed
// by the same layout functions the loads and stores use.  So the harness tests the tiling, padding and
// fragment indexing; that the layout functions match the hardware is what the device run (tests/gpu/) adds.
#pragma once
#include "common.cuh"

namespace kernelatlas {
namespace gpu {

constexpr int kWarp = 32;

// Fragments of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA, "Matrix Fragments for
// mma.m16n8k8", .tf32), lane = 4 * group + t:
//   A [16 rows][8 k]: a[i] at row group + 8 (i & 1), k t + 4 (i >> 1)
//   B [8 k][8 n]:     b[i] at k t + 4 i, n group
//   C [16 rows][8 n]: c[i] at row group + 8 (i >> 1), n 2 t + (i & 1)
KA_DEV_INLINE int frag_a_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }
KA_DEV_INLINE int frag_a_k(int lane, int i) { return (lane & 3) + 4 * (i >> 1); }
KA_DEV_INLINE int frag_b_k(int lane, int i) { return (lane & 3) + 4 * i; }
KA_DEV_INLINE int frag_b_n(int lane) { return lane >> 2; }
KA_DEV_INLINE int frag_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
KA_DEV_INLINE int frag_c_n(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

#if defined(__CUDA_ARCH__)
constexpr int kLanesPerCall = 1;  // the device: one lane per thread
#else
constexpr int kLanesPerCall = kWarp;  // the harness: the whole warp in one call
#endif

// fp32 -> TF32, to nearest with ties away from zero (cvt.rna.tf32.f32): the low 13 mantissa bits cleared.
// Inf and NaN pass as they are.
KA_DEV_INLINE float to_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  const uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;
  return bits_to_float((u + 0x1000u) & 0xffffe000u);
#endif
}

struct MmaFragments {
  float a[kLanesPerCall][4];
  float b[kLanesPerCall][2];
  float c[kLanesPerCall][4];
};

// c += A B over the warp's fragments.  The harness's emulation sums each product (exact for TF32 operands) in
// k order; the tensor core's order and rounding of the sum may differ in the last bits.
KA_DEV_INLINE void mma_tf32(MmaFragments& f) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(f.c[0][0]), "+f"(f.c[0][1]), "+f"(f.c[0][2]), "+f"(f.c[0][3])
      : "r"(__float_as_uint(f.a[0][0])), "r"(__float_as_uint(f.a[0][1])), "r"(__float_as_uint(f.a[0][2])),
        "r"(__float_as_uint(f.a[0][3])), "r"(__float_as_uint(f.b[0][0])), "r"(__float_as_uint(f.b[0][1])));
#else
  float A[16][8], B[8][8];
  for (int l = 0; l < kWarp; ++l) {
    for (int i = 0; i < 4; ++i) A[frag_a_row(l, i)][frag_a_k(l, i)] = f.a[l][i];
    for (int i = 0; i < 2; ++i) B[frag_b_k(l, i)][frag_b_n(l)] = f.b[l][i];
  }
  for (int l = 0; l < kWarp; ++l)
    for (int i = 0; i < 4; ++i) {
      float acc = f.c[l][i];
      for (int k = 0; k < 8; ++k) acc = std::fma(A[frag_c_row(l, i)][k], B[k][frag_c_n(l, i)], acc);
      f.c[l][i] = acc;
    }
#endif
}

// Whether a model's first encoder layer can take the TF32 path: a hidden layer packed in blocks of 8 (a
// single-layer encoder, d -> 1, keeps the exact path).
KA_DEV_INLINE bool tf32_applies(const GpuModel& m) { return m.n_enc >= 2 && m.enc[0].block == kBlockOut; }

// dst[o][r] = act(b[o] + sum_j w[o][j] x[j][r]) for the 32 rows [row0, row0 + 32) of xt ([in][stride]), every
// unit of layer L, by TF32 mma.  lane0: the first lane this call runs (the thread's own lane on the device, 0 in
// the harness).  Every lane of the warp must call it (mma.sync), live rows or not: rows past the input are
// zero columns and their outputs are never read.
KA_DEV_INLINE void dense_warp_tf32(const GpuLayer& L, const float* mp, const float* xt, float* dst, int stride,
                                   int row0, int lane0) {
  const Activation act = static_cast<Activation>(L.act);
  for (int m0 = row0; m0 < row0 + kWarp; m0 += 16) {
    for (int ob = 0; ob < L.out_pad; ob += kBlockOut) {
      const float* panel = mp + L.w + static_cast<int64_t>(ob) * L.in;  // [in][8]: B's k x n
      MmaFragments f;
      for (int l = 0; l < kLanesPerCall; ++l) {
        KA_UNROLL
        for (int i = 0; i < 4; ++i) f.c[l][i] = mp[L.b + ob + frag_c_n(lane0 + l, i)];
      }
      for (int k0 = 0; k0 < L.in; k0 += 8) {
        for (int l = 0; l < kLanesPerCall; ++l) {
          const int lane = lane0 + l;
          KA_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int j = k0 + frag_a_k(lane, i);
            f.a[l][i] = j < L.in ? to_tf32(xt[j * stride + m0 + frag_a_row(lane, i)]) : 0.f;
          }
          KA_UNROLL
          for (int i = 0; i < 2; ++i) {
            const int j = k0 + frag_b_k(lane, i);
            f.b[l][i] = j < L.in ? to_tf32(panel[j * kBlockOut + frag_b_n(lane)]) : 0.f;
          }
        }
        mma_tf32(f);
      }
      for (int l = 0; l < kLanesPerCall; ++l) {
        const int lane = lane0 + l;
        KA_UNROLL
        for (int i = 0; i < 4; ++i)
          dst[(ob + frag_c_n(lane, i)) * stride + m0 + frag_c_row(lane, i)] = activate_poly(act, f.c[l][i]);
      }
    }
  }
}

// The warp phase of an op: thread b.thread runs its lane on the device; in the harness the warp's lane 0 runs
// all 32 and the other threads return.  Returns false for the threads that have nothing to do.
KA_DEV_INLINE bool warp_lanes(const BlockCtx& b, int* row0, int* lane0) {
  *row0 = b.thread & ~(kWarp - 1);
#if defined(__CUDA_ARCH__)
  *lane0 = b.thread & (kWarp - 1);
  return true;
#else
  *lane0 = 0;
  return (b.thread & (kWarp - 1)) == 0;
#endif
}

}  // namespace gpu
}  // namespace kernelatlas
