// The table of per-ISA tile kernels.  Each ISA variant (isa/variant.cpp, compiled once per ISA) builds one
// TileKernels table from the generic code in isa/tile_impl.h; engine.cpp takes the active variant's table
// from the registry (isa_registry.h) once per call and runs it over tiles of rows inside the one parallel-for.
//
// A tile holds up to `tile_rows` kernels, transposed so that rows sit in SIMD lanes ("rows in lanes"): every
// per-row reduction (mean, norm, code, cosine) is then a plain vertical SIMD operation.  Tile kernels use no
// heap, no exceptions and no standard containers -- only raw pointers into caller-owned scratch -- so that
// nothing compiled with AVX-512 flags can be shared with (and leak into) the scalar path through the linker.
#pragma once
#include "kernelatlas/types.h"

namespace kernelatlas {

struct TileScratch {
  float* xt;    // [kMaxDim, tile_rows]        transposed, normalised kernels
  float* buf0;  // [max_width_pad, tile_rows]  layer ping-pong buffers
  float* buf1;  // [max_width_pad, tile_rows]
  float* aux;   // [8, tile_rows]              per-row values (good mask, norms, codes...)
};

struct AssignParams {
  float threshold = 0.85f;
  float min_abs = 0.0f;
  bool use_segments = true;
  Precision precision = Precision::fp32;  // bf16: only on the AVX-512 variant, when the CPU has AVX512_BF16
  // bf16: rows whose bf16 code lies within recheck_code of an interval edge, or whose score lies within
  // recheck_score of the threshold, are recomputed in fp32 (bit-identical to Precision::fp32)
  float recheck_code = 0.f, recheck_score = 0.f;
};

struct TileKernels {
  int tile_rows;
  // x rows [r0, r0+rows) -> normalized [rows, d] and norms [rows]
  void (*normalize)(const KernelsIn& x, idx_t r0, int rows, float min_abs, float* normalized, float* norms,
                    const TileScratch& s);
  // -> codes [rows] (NaN for dead / non-finite kernels)
  void (*encode)(const ModelView& m, const KernelsIn& x, idx_t r0, int rows, float min_abs, Precision precision,
                 float* codes, const TileScratch& s);
  // codes [rows] -> decoded [rows, d] (the decoder MLP; NaN rows for non-finite codes)
  void (*decode)(const ModelView& m, const float* codes, int rows, float* decoded, const TileScratch& s);
  // fused paper-mode assignment -> labels [rows], scores [rows], codes [rows]
  void (*assign)(const ModelView& m, const KernelsIn& x, idx_t r0, int rows, const AssignParams& p, int16_t* labels,
                 float* scores, float* codes, const TileScratch& s);
  // prototype assignment -> labels [rows], scores [rows]
  void (*assign_prototypes)(const PrototypeView& p, const KernelsIn& x, idx_t r0, int rows, float threshold,
                            float min_abs, int16_t* labels, float* scores, const TileScratch& s);
  // FMA throughput probe: runs `iters` rounds of independent FMA chains, returns a value to defeat DCE
  float (*fma_probe)(int64_t iters);
  int fma_flops_per_iter;
};

}  // namespace kernelatlas
