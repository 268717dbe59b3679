// Where the time of one assign tile goes, per stage, on one core: load (+ transpose), normalise, encoder MLP,
// cosine against the segment table, and the whole fused assign_entry -- in ns per kernel, with the encoder's
// and the whole pass's GFLOP/s, so that each stage can be set against the machine's FMA peak (a roofline of
// the tile, issue 16).  Built straight from the engine's own per-ISA source (cpp/src/isa/tile_impl.h) with the
// flags of each variant; run by benchmarks/native/tile_breakdown.sh:
//
//   bash benchmarks/native/tile_breakdown.sh            # k = 3, 5, 7; inputs in cache and streamed from DRAM
//
// The model is the bench's shape (d -> 64 -> 32 -> 1, ReLU, sigmoid code) with random weights and a 24-segment
// table; the input is random normal float32 rows, either 20,160 rows (about 1-4 MB: L2/L3) reused or N rows
// streamed once per pass.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "isa/tile_impl.h"

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
  const int n_seg = 24;
  const std::vector<float> x = normal(static_cast<size_t>(n) * d, 1.f);
  KernelsIn in;
  in.data = x.data();
  in.rows = n;
  in.d = d;

  // encoder d -> 64 -> 32 -> 1, packed [out/8][in][8] (random weights: the packing does not matter for speed)
  const int widths[4] = {d, 64, 32, 1};
  std::vector<std::vector<float>> store;
  ModelView m;
  m.d = d;
  m.n_enc = 3;
  m.max_width_pad = 64;
  for (int i = 0; i < 3; ++i) {
    LayerView& L = m.enc[i];
    L.in = widths[i];
    L.out = L.out_pad = widths[i + 1];
    L.block = L.out == 1 ? 1 : kBlockOut;
    L.act = i < 2 ? Activation::relu : Activation::sigmoid;
    store.push_back(normal(static_cast<size_t>(L.in) * L.out_pad, 1.f / std::sqrt(static_cast<float>(L.in))));
    L.w = store.back().data();
    store.push_back(normal(L.out_pad, 0.1f));
    L.b = store.back().data();
  }
  // a segment table (both layouts), 2 cluster intervals
  std::vector<float> t(n_seg - 1), zc(n_seg), c = normal(static_cast<size_t>(n_seg) * d, 1.f),
                                               b = normal(static_cast<size_t>(n_seg) * d, 1.f);
  for (int i = 0; i < n_seg - 1; ++i) t[i] = (i + 1.f) / n_seg;
  for (int i = 0; i < n_seg; ++i) zc[i] = (i + 0.5f) / n_seg;
  const int pad = (n_seg + 15) / 16 * 16;
  std::vector<float> tp(pad, INFINITY), zcp(pad, 0.f), ct(static_cast<size_t>(d) * pad, 0.f),
      bt(static_cast<size_t>(d) * pad, 0.f);
  for (int i = 0; i < n_seg; ++i) {
    if (i < n_seg - 1) tp[i] = t[i];
    zcp[i] = zc[i];
    for (int j = 0; j < d; ++j) {
      ct[static_cast<size_t>(j) * pad + i] = c[static_cast<size_t>(i) * d + j];
      bt[static_cast<size_t>(j) * pad + i] = b[static_cast<size_t>(i) * d + j];
    }
  }
  m.n_seg = n_seg;
  m.seg_t = t.data();
  m.seg_zc = zc.data();
  m.seg_c = c.data();
  m.seg_b = b.data();
  m.seg_pad = pad <= kMaxTableSeg ? pad : 0;
  m.seg_t_pad = tp.data();
  m.seg_zc_pad = zcp.data();
  m.seg_c_t = ct.data();
  m.seg_b_t = bt.data();
  const float lo[2] = {0.f, 0.5f}, hi[2] = {0.5f, 1.f};
  m.n_int = 2;
  m.int_lo = lo;
  m.int_hi = hi;

  std::vector<float> xt(static_cast<size_t>(kMaxDim) * T), b0(static_cast<size_t>(kMaxWidth) * T),
      b1(static_cast<size_t>(kMaxWidth) * T), aux(8 * T);
  const TileScratch s{xt.data(), b0.data(), b1.data(), aux.data()};
  std::vector<int16_t> labels(n);
  std::vector<float> scores(n), codes(n);
  AssignParams p;
  p.threshold = 0.5f;

  const double t_load = ns_per_row([&] { for (idx_t r0 = 0; r0 < n; r0 += T) load_tile(in, r0, T, s.xt); }, n);
  const double t_norm = ns_per_row(
      [&] { for (idx_t r0 = 0; r0 < n; r0 += T) normalize_tile(s.xt, d, 0.f, s.aux + kGood * T, s.aux + kNorm * T); }, n);
  const double t_enc = ns_per_row([&] { for (idx_t r0 = 0; r0 < n; r0 += T) encode_normalized(m, Precision::fp32, s); }, n);
  const double t_cos = ns_per_row([&] { for (idx_t r0 = 0; r0 < n; r0 += T) cosine_tile(m, true, s, s.aux + kScore * T); }, n);
  const double t_all = ns_per_row([&] {
    for (idx_t r0 = 0; r0 < n; r0 += T)
      assign_entry(m, in, r0, T, p, labels.data() + r0, scores.data() + r0, codes.data() + r0, s);
  }, n);
  const double enc_flop = 2.0 * (d * 64 + 64 * 32 + 32), all_flop = enc_flop + 5.0 * d + 6.0 * d;
  std::printf("%-6s d=%2d rows=%-9lld load %5.1f  normalise %5.1f  encoder %6.1f (%5.1f GFLOP/s)  cosine %5.1f  |  assign %6.1f ns/kernel = %5.1f GFLOP/s\n",
              KA_ISA == 2 ? "avx512" : KA_ISA == 1 ? "avx2" : "scalar", d, static_cast<long long>(n), t_load, t_norm,
              t_enc, enc_flop / t_enc, t_cos, t_all, all_flop / t_all);
  return 0;
}
