// Model construction: validation, weight packing for the tile kernels, and the exact piecewise-linear form of
// a ReLU/identity decoder.  With a 1-D code z the decoder output is continuous and piecewise linear in z; we
// find every breakpoint (in float64) by pushing affine functions of z through the layers and splitting where
// a ReLU unit changes sign.  Each segment is stored around an interior point zc as c + (z - zc) * slope, so
// evaluating it in fp32 is as accurate as running the MLP (no cancellation between large a and z*b terms).
#include "kernelatlas/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace kernelatlas {

Activation parse_activation(const std::string& name) {
  if (name == "identity" || name == "linear" || name == "none") return Activation::identity;
  if (name == "relu") return Activation::relu;
  if (name == "sigmoid") return Activation::sigmoid;
  if (name == "tanh") return Activation::tanh;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  throw std::invalid_argument("unknown activation '" + name +
                              "': use one of identity, relu, sigmoid, tanh, gelu, gelu_tanh");
}

const char* activation_name(Activation act) {
  switch (act) {
    case Activation::identity: return "identity";
    case Activation::relu: return "relu";
    case Activation::sigmoid: return "sigmoid";
    case Activation::tanh: return "tanh";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
  }
  return "?";
}

namespace {

void check_layer(const DenseSpec& L, const std::string& where) {
  if (L.in < 1 || L.out < 1)
    throw std::invalid_argument(where + ": layer sizes must be positive, got " + std::to_string(L.in) + " -> " +
                                std::to_string(L.out));
  if (L.weight.size() != static_cast<size_t>(L.in) * L.out)
    throw std::invalid_argument(where + ": weight must have shape [out, in] = [" + std::to_string(L.out) + ", " +
                                std::to_string(L.in) + "]");
  if (L.bias.size() != static_cast<size_t>(L.out))
    throw std::invalid_argument(where + ": bias must have " + std::to_string(L.out) + " entries");
  for (float w : L.weight)
    if (!std::isfinite(w)) throw std::invalid_argument(where + ": weight holds NaN or Inf; the model is corrupt");
  for (float b : L.bias)
    if (!std::isfinite(b)) throw std::invalid_argument(where + ": bias holds NaN or Inf; the model is corrupt");
}

// float -> bfloat16 bits, round to nearest even (what the AVX512_BF16 conversions do for the inputs); the
// weights are finite (validated), so no NaN handling is needed.
uint32_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

PackedLayer pack(const DenseSpec& L) {
  PackedLayer p;
  const int block = L.out == 1 ? 1 : kBlockOut;
  const int out_pad = (L.out + block - 1) / block * block;
  p.w.assign(static_cast<size_t>(out_pad) * L.in, 0.f);
  p.b.assign(out_pad, 0.f);
  for (int o = 0; o < L.out; ++o) {
    const int ob = o / block * block, b = o % block;
    for (int j = 0; j < L.in; ++j)
      p.w[static_cast<size_t>(ob) * L.in + static_cast<size_t>(j) * block + b] =
          L.weight[static_cast<size_t>(o) * L.in + j];
    p.b[o] = L.bias[o];
  }
  p.view.in = L.in;
  p.view.out = L.out;
  p.view.out_pad = out_pad;
  p.view.block = block;
  p.view.act = L.act;
  p.view.w = p.w.data();
  p.view.b = p.b.data();
  if (block == kBlockOut) {
    const int pairs = (L.in + 1) / 2;
    p.w_bf16.assign(static_cast<size_t>(out_pad) * pairs, 0u);
    for (int o = 0; o < L.out; ++o) {
      const int ob = o / block * block, b = o % block;
      for (int j = 0; j < L.in; ++j) {
        const uint32_t h = to_bf16(L.weight[static_cast<size_t>(o) * L.in + j]);
        p.w_bf16[static_cast<size_t>(ob) * pairs + static_cast<size_t>(j / 2) * block + b] |= h << (16 * (j % 2));
      }
    }
    p.view.w_bf16 = p.w_bf16.data();
  }
  return p;
}

bool piecewise_linear_act(Activation a) { return a == Activation::identity || a == Activation::relu; }

// A finite point inside [lo, hi] (either end may be infinite).
double interior(double lo, double hi) {
  if (std::isfinite(lo) && std::isfinite(hi)) return 0.5 * (lo + hi);
  if (std::isfinite(lo)) return lo + 1.0;
  if (std::isfinite(hi)) return hi - 1.0;
  return 0.0;
}

struct Segment {
  double lo, hi;
  std::vector<double> a, b;  // layer output = a + z * b on [lo, hi]
};

}  // namespace

AutoencoderModel::AutoencoderModel(int d, std::vector<DenseSpec> encoder, std::vector<DenseSpec> decoder,
                                   std::vector<float> int_lo, std::vector<float> int_hi) {
  if (d < 1 || d > kMaxDim)
    throw std::invalid_argument("kernel entries d = " + std::to_string(d) + " is out of range 1.." +
                                std::to_string(kMaxDim) + " (3x3 -> 9, 5x5 -> 25, 7x7 -> 49)");
  const auto check_side = [&](const std::vector<DenseSpec>& side, const char* name, int first_in, int last_out) {
    if (side.empty() || side.size() > static_cast<size_t>(kMaxLayersPerSide))
      throw std::invalid_argument(std::string(name) + " must have 1.." + std::to_string(kMaxLayersPerSide) +
                                  " Linear layers (up to 4 hidden layers), got " + std::to_string(side.size()));
    int prev = first_in;
    for (size_t i = 0; i < side.size(); ++i) {
      const std::string where = std::string(name) + " layer " + std::to_string(i);
      check_layer(side[i], where);
      if (side[i].in != prev)
        throw std::invalid_argument(where + " takes " + std::to_string(side[i].in) +
                                    " inputs but the previous layer gives " + std::to_string(prev));
      if (side[i].out > kMaxWidth)
        throw std::invalid_argument(where + " is " + std::to_string(side[i].out) +
                                    " wide; the engine supports widths up to " + std::to_string(kMaxWidth));
      prev = side[i].out;
    }
    if (prev != last_out)
      throw std::invalid_argument(std::string(name) + " must end in " + std::to_string(last_out) + " output(s), got " +
                                  std::to_string(prev) + (last_out == 1 ? " (the code is one-dimensional)" : ""));
  };
  check_side(encoder, "encoder", d, 1);
  check_side(decoder, "decoder", 1, d);

  if (int_lo.size() != int_hi.size()) throw std::invalid_argument("cluster intervals: lo and hi differ in length");
  for (size_t i = 0; i < int_lo.size(); ++i) {
    if (!(std::isfinite(int_lo[i]) && std::isfinite(int_hi[i]) && int_lo[i] < int_hi[i]))
      throw std::invalid_argument("cluster interval " + std::to_string(i) + " = [" + std::to_string(int_lo[i]) + ", " +
                                  std::to_string(int_hi[i]) + ") must be finite with lo < hi");
    if (i > 0 && int_lo[i] < int_hi[i - 1])
      throw std::invalid_argument("cluster intervals must be sorted and must not overlap: interval " +
                                  std::to_string(i) + " starts before interval " + std::to_string(i - 1) + " ends");
  }
  if (int_lo.size() > 32767) throw std::invalid_argument("too many cluster intervals (labels are int16)");
  int_lo_ = std::move(int_lo);
  int_hi_ = std::move(int_hi);

  view_.d = d;
  view_.n_enc = static_cast<int32_t>(encoder.size());
  view_.n_dec = static_cast<int32_t>(decoder.size());
  for (const auto& L : encoder) enc_.push_back(pack(L));
  for (const auto& L : decoder) dec_.push_back(pack(L));
  int widest = d;
  for (size_t i = 0; i < enc_.size(); ++i) {
    view_.enc[i] = enc_[i].view;
    widest = std::max(widest, enc_[i].view.out_pad);
  }
  for (size_t i = 0; i < dec_.size(); ++i) {
    view_.dec[i] = dec_[i].view;
    widest = std::max(widest, dec_[i].view.out_pad);
  }
  view_.max_width_pad = widest;
  view_.n_int = static_cast<int32_t>(int_lo_.size());
  view_.int_lo = int_lo_.data();
  view_.int_hi = int_hi_.data();
  build_segments(decoder, encoder.back().act);
}

void AutoencoderModel::build_segments(const std::vector<DenseSpec>& decoder, Activation code_act) {
  view_.n_seg = 0;
  for (const auto& L : decoder)
    if (!piecewise_linear_act(L.act)) return;  // the MLP it is

  // The code's range: only breakpoints inside it matter.
  double lo = -INFINITY, hi = INFINITY;
  if (code_act == Activation::sigmoid) lo = 0.0, hi = 1.0;
  if (code_act == Activation::tanh) lo = -1.0, hi = 1.0;
  if (code_act == Activation::relu) lo = 0.0;

  std::vector<Segment> segs{{lo, hi, {0.0}, {1.0}}};
  for (const auto& L : decoder) {
    std::vector<Segment> next;
    for (const auto& s : segs) {
      std::vector<double> pa(L.out), pb(L.out);
      for (int o = 0; o < L.out; ++o) {
        double a = L.bias[o], b = 0.0;
        for (int j = 0; j < L.in; ++j) {
          const double w = L.weight[static_cast<size_t>(o) * L.in + j];
          a += w * s.a[j];
          b += w * s.b[j];
        }
        pa[o] = a;
        pb[o] = b;
      }
      if (L.act == Activation::identity) {
        next.push_back({s.lo, s.hi, std::move(pa), std::move(pb)});
        continue;
      }
      std::vector<double> cuts;
      for (int o = 0; o < L.out; ++o) {
        if (pb[o] == 0.0) continue;
        const double t = -pa[o] / pb[o];
        if (t > s.lo && t < s.hi) cuts.push_back(t);
      }
      std::sort(cuts.begin(), cuts.end());
      cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
      double start = s.lo;
      for (size_t k = 0; k <= cuts.size(); ++k) {
        const double end = k < cuts.size() ? cuts[k] : s.hi;
        const double zm = interior(start, end);
        Segment piece{start, end, std::vector<double>(L.out), std::vector<double>(L.out)};
        for (int o = 0; o < L.out; ++o) {
          if (pa[o] + zm * pb[o] > 0.0) {
            piece.a[o] = pa[o];
            piece.b[o] = pb[o];
          }
        }
        next.push_back(std::move(piece));
        start = end;
      }
      if (next.size() > static_cast<size_t>(kMaxSegments)) return;  // fall back to the MLP
    }
    segs = std::move(next);
  }

  const int n = static_cast<int>(segs.size());
  const int d = view_.d;
  seg_t_.resize(n - 1);
  seg_zc_.resize(n);
  seg_c_.resize(static_cast<size_t>(n) * d);
  seg_b_.resize(static_cast<size_t>(n) * d);
  for (int s = 0; s < n; ++s) {
    if (s > 0) seg_t_[s - 1] = static_cast<float>(segs[s].lo);
    const double zc = interior(segs[s].lo, segs[s].hi);
    seg_zc_[s] = static_cast<float>(zc);
    for (int j = 0; j < d; ++j) {
      seg_c_[static_cast<size_t>(s) * d + j] = static_cast<float>(segs[s].a[j] + zc * segs[s].b[j]);
      seg_b_[static_cast<size_t>(s) * d + j] = static_cast<float>(segs[s].b[j]);
    }
  }
  view_.n_seg = n;
  view_.seg_t = seg_t_.data();
  view_.seg_zc = seg_zc_.data();
  view_.seg_c = seg_c_.data();
  view_.seg_b = seg_b_.data();

  if (n <= kMaxTableSeg) {
    const int pad = (n + 15) / 16 * 16;
    seg_t_pad_.assign(pad, INFINITY);
    seg_zc_pad_.assign(pad, 0.f);
    seg_c_t_.assign(static_cast<size_t>(d) * pad, 0.f);
    seg_b_t_.assign(static_cast<size_t>(d) * pad, 0.f);
    std::copy(seg_t_.begin(), seg_t_.end(), seg_t_pad_.begin());
    std::copy(seg_zc_.begin(), seg_zc_.end(), seg_zc_pad_.begin());
    for (int s = 0; s < n; ++s)
      for (int j = 0; j < d; ++j) {
        seg_c_t_[static_cast<size_t>(j) * pad + s] = seg_c_[static_cast<size_t>(s) * d + j];
        seg_b_t_[static_cast<size_t>(j) * pad + s] = seg_b_[static_cast<size_t>(s) * d + j];
      }
    view_.seg_pad = pad;
    view_.seg_t_pad = seg_t_pad_.data();
    view_.seg_zc_pad = seg_zc_pad_.data();
    view_.seg_c_t = seg_c_t_.data();
    view_.seg_b_t = seg_b_t_.data();
  }
}

PrototypeSet::PrototypeSet(int d, int n_proto, const float* prototypes) {
  if (d < 1 || d > kMaxDim) throw std::invalid_argument("prototype size d out of range 1.." + std::to_string(kMaxDim));
  if (n_proto < 1 || n_proto > kMaxPrototypes)
    throw std::invalid_argument("need 1.." + std::to_string(kMaxPrototypes) + " prototypes, got " +
                                std::to_string(n_proto));
  normalized_.resize(static_cast<size_t>(n_proto) * d);
  DenseSpec spec;
  spec.in = d;
  spec.out = n_proto;
  spec.bias.assign(n_proto, 0.f);
  for (int p = 0; p < n_proto; ++p) {
    const float* row = prototypes + static_cast<size_t>(p) * d;
    double mean = 0.0, amax = 0.0;
    for (int j = 0; j < d; ++j) {
      if (!std::isfinite(row[j])) throw std::invalid_argument("prototype " + std::to_string(p) + " holds NaN or Inf");
      mean += row[j];
      amax = std::max(amax, std::fabs(static_cast<double>(row[j])));
    }
    mean /= d;
    double ss = 0.0;
    for (int j = 0; j < d; ++j) ss += (row[j] - mean) * (row[j] - mean);
    const double norm = std::sqrt(ss);
    if (!(norm > 1e-5 * amax) || norm == 0.0)
      throw std::invalid_argument("prototype " + std::to_string(p) +
                                  " is constant or all zero: it has no pattern to compare kernels with");
    for (int j = 0; j < d; ++j)
      normalized_[static_cast<size_t>(p) * d + j] = static_cast<float>((row[j] - mean) / norm);
  }
  spec.weight = normalized_;
  layer_ = pack(spec);
  view_.d = d;
  view_.n_proto = n_proto;
  view_.layer = layer_.view;
}

}  // namespace kernelatlas
