// Where the time of one assign tile goes, per stage, on one core: load (+ transpose), normalise, encoder MLP,
// cosine against the segment table, and the whole fused assign_entry -- in ns per kernel, with the encoder's
// and the whole pass's GFLOP/s, so that each stage can be set against the machine's FMA peak (a roofline of
// the tile, issue 16).  Built straight from the engine's own per-ISA source (cpp/src/isa/tile_impl.h) with the
// flags of each variant; run by benchmarks/native/tile_breakdown.sh:
//
//   bash benchmarks/native/tile_breakdown.sh            # k = 3, 5, 7; inputs in cache and streamed from DRAM
//
// The model is the bench's shape (d -> 64 -> 32 -> 1, ReLU, sigmoid code; decoder 1 -> 32 -> 64 -> d) with
// random weights, its segment table the engine's own (its length printed); the input is random normal float32 rows,
// either 20,160 rows (about 1-4 MB: L2/L3) reused or N rows streamed once per pass.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "isa/tile_impl.h"
#include "kernelatlas/model.h"

using namespace kernelatlas;
using namespace kernelatlas::KA_NS;

namespace {

std::mt19937 rng(1);

std::vector<float> normal(size_t n, float scale) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng) * scale;
  return v;
}

// Best of `reps` runs of f over n rows, in ns per row.
template <class F>
double ns_per_row(F f, idx_t n, int reps = 30) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best / static_cast<double>(n) * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int d = argc > 1 ? std::atoi(argv[1]) : 49;
  const idx_t n = (argc > 2 ? std::atol(argv[2]) : 20160) / T * T;
  const std::vector<float> x = normal(static_cast<size_t>(n) * d, 1.f);
  KernelsIn in;
  in.data = x.data();
  in.rows = n;
  in.d = d;

  // the bench's autoencoder with random weights, built, packed and tabled by the engine's own model code
  // (cpp/src/model.cpp): encoder d -> 64 -> 32 -> 1 (ReLU, ReLU, sigmoid), decoder 1 -> 32 -> 64 -> d (ReLU)
  const auto dense = [](int in, int out, Activation act) {
    DenseSpec L;
    L.in = in;
    L.out = out;
    L.act = act;
    L.weight = normal(static_cast<size_t>(in) * out, 1.f / std::sqrt(static_cast<float>(in)));
    L.bias = normal(out, 0.1f);
    return L;
  };
  const AutoencoderModel model(
      d, {dense(d, 64, Activation::relu), dense(64, 32, Activation::relu), dense(32, 1, Activation::sigmoid)},
      {dense(1, 32, Activation::relu), dense(32, 64, Activation::relu), dense(64, d, Activation::identity)},
      {0.f, 0.5f}, {0.5f, 1.f});
  const ModelView& m = model.view();

  // 64-byte aligned scratch, as the engine's (parallel.h): unaligned buffers split vector loads over cache lines
  const size_t xt_n = static_cast<size_t>(kMaxDim) * T, buf_n = static_cast<size_t>(kMaxWidth) * T;
  std::vector<float> scratch(xt_n + 2 * buf_n + 8 * T + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
  const TileScratch s{base, base + xt_n, base + xt_n + buf_n, base + xt_n + 2 * buf_n};
  std::vector<int16_t> labels(n);
  std::vector<float> scores(n), codes(n);
  AssignParams p;
  p.threshold = 0.5f;

  const double t_load = ns_per_row(
      [&] {
        for (idx_t r0 = 0; r0 < n; r0 += T) load_tile(in, r0, T, s.xt);
      },
      n);
  const double t_norm = ns_per_row(
      [&] {
        for (idx_t r0 = 0; r0 < n; r0 += T) normalize_tile(s.xt, d, 0.f, s.aux + kGood * T, s.aux + kNorm * T);
      },
      n);
  const double t_enc = ns_per_row(
      [&] {
        for (idx_t r0 = 0; r0 < n; r0 += T) encode_normalized(m, Precision::fp32, s);
      },
      n);
  std::vector<double> t_layer(m.n_enc), layer_flop(m.n_enc);
  double enc_flop = 0.0;  // 2 per multiply-add of the encoder's layers, as the model has them
  for (int i = 0; i < m.n_enc; ++i) {
    layer_flop[i] = 2.0 * m.enc[i].in * m.enc[i].out;
    enc_flop += layer_flop[i];
    const float* src = i == 0 ? s.xt : (i & 1 ? s.buf0 : s.buf1);
    float* dst = i & 1 ? s.buf1 : s.buf0;
    t_layer[i] = ns_per_row(
        [&] {
          for (idx_t r0 = 0; r0 < n; r0 += T) dense_layer(m.enc[i], src, dst);
        },
        n);
  }
  const double t_cos = ns_per_row(
      [&] {
        for (idx_t r0 = 0; r0 < n; r0 += T) cosine_tile(m, true, s, s.aux + kScore * T);
      },
      n);
  const double t_all = ns_per_row(
      [&] {
        for (idx_t r0 = 0; r0 < n; r0 += T)
          assign_entry(m, in, r0, T, p, labels.data() + r0, scores.data() + r0, codes.data() + r0, s);
      },
      n);
  const double all_flop = enc_flop + 5.0 * d + 6.0 * d;  // + normalise 5d + cosine 6d, as kernelatlas bench counts
  std::printf(
      "%-6s d=%2d seg=%2d rows=%-9lld load %5.1f  normalise %5.1f  encoder %6.1f (%5.1f GFLOP/s)  cosine %5.1f  |  "
      "assign %6.1f ns/kernel = %5.1f GFLOP/s\n",
      KA_ISA == 2   ? "avx512"
      : KA_ISA == 1 ? "avx2"
                    : "scalar",
      d, m.n_seg, static_cast<long long>(n), t_load, t_norm, t_enc, enc_flop / t_enc, t_cos, t_all, all_flop / t_all);
  std::printf("       layers:");
  for (int i = 0; i < m.n_enc; ++i)
    std::printf("  %d: %5.1f ns (%5.1f GFLOP/s)", i, t_layer[i], layer_flop[i] / t_layer[i]);
  std::printf("\n");
  return 0;
}
