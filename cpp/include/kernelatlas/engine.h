// The CPU engine's public C++ entry points: raw pointers and int64 sizes, no Python.  Each call picks the ISA
// once (dispatch), then runs the tile kernels over row tiles in one OpenMP parallel-for (serial below a size
// threshold); an exception in any worker is collected and rethrown once on the calling thread.
#pragma once
#include <string>
#include <vector>

#include "kernelatlas/model.h"
#include "kernelatlas/types.h"

namespace kernelatlas {

// ---- instruction-set dispatch ----
// (Isa is in types.h.)  The ISAs below are those of the compiled variants (the registry, dispatch.cpp).
Isa best_supported_isa();                      // the highest compiled ISA this CPU (and OS) can run
std::vector<std::string> supported_isas();     // e.g. {"scalar", "avx2", "avx512"}
std::vector<std::string> compiled_isas();      // the variants in this build, lowest first
Isa active_isa();                              // the forced one, else the best
std::string isa_name(Isa isa);
// Forces an ISA ("scalar", "avx2", "avx512") or restores automatic choice (""); returns the previous setting.
// Throws std::invalid_argument when the CPU cannot run it.  Initialised from $KERNELATLAS_ISA.
std::string set_isa(const std::string& name);
std::string forced_isa();
// Whether Precision::bf16 can run now (an AVX-512 variant with AVX512_BF16 on this CPU, and the avx512 path
// active); otherwise false and *why (when given) says why.
bool bf16_available(std::string* why = nullptr);

int default_threads();  // OpenMP's max threads (1 without OpenMP)
bool openmp_enabled();

// ---- kernels ----
// normalized: [n, d] float32, norms: [n] float32
void normalize(const KernelsIn& x, float min_abs, float* normalized, float* norms, int threads);
// codes: [n].  precision bf16 throws std::invalid_argument when !bf16_available().
void encode(const ModelView& m, const KernelsIn& x, float min_abs, float* codes, int threads,
            Precision precision = Precision::fp32);
// codes: [n] -> decoded: [n, d]
void decode(const ModelView& m, const float* codes, idx_t n, float* decoded, int threads);
// decoded: [n, d] = decode(encode(x))
void reconstruct(const ModelView& m, const KernelsIn& x, float min_abs, float* decoded, int threads);
// labels: [n] int16, scores: [n], codes: [n]
void assign(const ModelView& m, const KernelsIn& x, float threshold, float min_abs, bool use_segments, int16_t* labels,
            float* scores, float* codes, int threads, Precision precision = Precision::fp32, float recheck_code = 0.f,
            float recheck_score = 0.f);
// precision bf16: rows whose bf16 code is within recheck_code of an interval edge, or whose score is within
// recheck_score of the threshold, are recomputed in fp32 (exactly the fp32 result).
// labels: [n] int16, scores: [n]
void assign_prototypes(const PrototypeView& p, const KernelsIn& x, float threshold, float min_abs, int16_t* labels,
                       float* scores, int threads);

// Per-segment label statistics of assign's outputs, for the per-layer tables: segment j is rows
// [starts[j], stops[j]); counts is [segments, n_labels + 2] int64 (zeroed here): column 0 counts label -1,
// column 1 + c cluster c, the last column dead kernels -- value NaN when nan_is_dead (codes), else label -1
// with value 0 (prototype scores).  Returns the number of labels outside [-1, n_labels) (not counted).
int64_t label_counts(const int16_t* labels, const float* values, const int64_t* starts, const int64_t* stops,
                     idx_t segments, int n_labels, bool nan_is_dead, int64_t* counts, int threads);

// Measured FP32 FMA throughput of the active ISA with `threads` threads over about `seconds`, in GFLOP/s.
double fma_peak_gflops(double seconds, int threads);

}  // namespace kernelatlas
