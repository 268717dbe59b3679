// Plain types shared by every part of the engine (CPU ISA variants, the CUDA module, the bindings).
// Nothing here allocates or knows about Python: kernels see only these views and raw pointers.
#pragma once
#include <cstdint>

namespace kernelatlas {

using idx_t = int64_t;  // every row count and offset: corpora exceed 2^31 kernels

enum class Activation : int32_t { identity = 0, relu = 1, sigmoid = 2, tanh = 3, gelu = 4, gelu_tanh = 5 };

enum class DType : int32_t { float32 = 0, float16 = 1 };

// Arithmetic of the encoder's hidden layers: fp32 (the default, exact to the reference's tolerances) or bf16
// (opt-in: inputs and weights rounded to bfloat16, products summed in fp32 by AVX512_BF16 dot products).
enum class Precision : int32_t { fp32 = 0, bf16 = 1 };

// Instruction-set levels of the CPU kernels, lowest first (cpp/src/dispatch.cpp picks one per call).
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

constexpr int kMaxLayersPerSide = 5;   // up to 4 hidden layers + the code / output layer
constexpr int kMaxWidth = 256;         // widest hidden layer
constexpr int kMaxDim = 64;            // kernel entries per row (7x7 = 49; 8x8 is the largest we accept)
constexpr int kMaxPrototypes = 256;
constexpr int kMaxTableSeg = 64;    // longest segment table looked up by SIMD permutes
constexpr int kBlockOut = 8;           // output units per packed weight block (see LayerView)

// A dense layer y = act(W x + b), weights packed for the rows-in-lanes kernels:
// w: [out_pad / block][in][block], b: [out_pad]; padded units have zero weights and bias.
struct LayerView {
  int32_t in = 0;
  int32_t out = 0;
  int32_t out_pad = 0;
  int32_t block = kBlockOut;  // kBlockOut, or 1 for a single-unit layer (the code layer)
  Activation act = Activation::identity;
  const float* w = nullptr;  // [out_pad/block, in, block]
  const float* b = nullptr;  // [out_pad]
  // The weights as bfloat16 pairs for Precision::bf16 (layers with block = kBlockOut): [out_pad/block,
  // (in+1)/2, block], each uint32 = bf16(w[o][2p]) | bf16(w[o][2p+1]) << 16 (0 past `in`).
  const uint32_t* w_bf16 = nullptr;
};

// Everything the tile kernels need to know about an autoencoder.
struct ModelView {
  int32_t d = 0;  // kernel entries (k*k)
  int32_t n_enc = 0, n_dec = 0;
  LayerView enc[kMaxLayersPerSide];
  LayerView dec[kMaxLayersPerSide];
  int32_t max_width_pad = 0;  // widest padded layer, for scratch sizing

  // Piecewise-linear decoder table (present when every decoder activation is relu/identity):
  // segment s covers [t[s-1], t[s]) of the code axis and decodes to c[s] + (z - zc[s]) * slope[s].
  int32_t n_seg = 0;             // 0: no table, run the decoder MLP
  const float* seg_t = nullptr;  // [n_seg - 1] sorted breakpoints
  const float* seg_zc = nullptr; // [n_seg] expansion point inside each segment
  const float* seg_c = nullptr;  // [n_seg, d] decoded pattern at zc
  const float* seg_b = nullptr;  // [n_seg, d] slope d(decoded)/dz
  // The same table transposed and padded for in-register lookups (SIMD permutes) when n_seg <= kMaxTableSeg:
  int32_t seg_pad = 0;            // n_seg rounded up to 16, or 0 when the table is too long for permutes
  const float* seg_t_pad = nullptr;   // [seg_pad] breakpoints, +inf padded (entry s-1 ends segment s-1)
  const float* seg_zc_pad = nullptr;  // [seg_pad]
  const float* seg_c_t = nullptr;     // [d, seg_pad]
  const float* seg_b_t = nullptr;     // [d, seg_pad]

  // Cluster intervals on the code axis, sorted, non-overlapping: [lo, hi), the last one closed.
  int32_t n_int = 0;
  const float* int_lo = nullptr;  // [n_int]
  const float* int_hi = nullptr;  // [n_int]
};

// A prototype set, centred and L2-normalised, packed like a LayerView with out = n_proto and no bias.
struct PrototypeView {
  int32_t d = 0;
  int32_t n_proto = 0;
  LayerView layer;
};

// One input batch: rows of d entries, fp32 or fp16, C-contiguous.
struct KernelsIn {
  const void* data = nullptr;  // [rows, d]
  DType dtype = DType::float32;
  idx_t rows = 0;
  int32_t d = 0;
};

}  // namespace kernelatlas
