// Owning, validated engine-side models: the autoencoder (packed layers, the piecewise-linear decoder table,
// cluster intervals) and the prototype set.  Built once from plain weight arrays; kernels only see the views.
#pragma once
#include <string>
#include <vector>

#include "kernelatlas/types.h"

namespace kernelatlas {

struct DenseSpec {
  int in = 0, out = 0;
  Activation act = Activation::identity;
  std::vector<float> weight;  // [out, in], row-major (torch nn.Linear layout)
  std::vector<float> bias;    // [out]
};

Activation parse_activation(const std::string& name);  // throws std::invalid_argument naming the choices
const char* activation_name(Activation act);

struct PackedLayer {
  std::vector<float> w, b;
  std::vector<uint32_t> w_bf16;  // LayerView::w_bf16 (empty for single-unit layers)
  LayerView view;
};

class AutoencoderModel {
 public:
  // Validates shapes (d -> ... -> 1 -> ... -> d, widths <= kMaxWidth, <= kMaxLayersPerSide layers per side)
  // and intervals (sorted, non-overlapping, lo < hi); throws std::invalid_argument with the fix.
  AutoencoderModel(int d, std::vector<DenseSpec> encoder, std::vector<DenseSpec> decoder, std::vector<float> int_lo,
                   std::vector<float> int_hi);
  AutoencoderModel(const AutoencoderModel&) = delete;
  AutoencoderModel& operator=(const AutoencoderModel&) = delete;

  const ModelView& view() const { return view_; }
  int d() const { return view_.d; }
  bool piecewise_linear() const { return view_.n_seg > 0; }
  int n_segments() const { return view_.n_seg; }
  const std::vector<float>& seg_t() const { return seg_t_; }
  const std::vector<float>& seg_zc() const { return seg_zc_; }
  const std::vector<float>& seg_c() const { return seg_c_; }
  const std::vector<float>& seg_b() const { return seg_b_; }

 private:
  void build_segments(const std::vector<DenseSpec>& decoder, Activation code_act);
  std::vector<PackedLayer> enc_, dec_;
  std::vector<float> seg_t_, seg_zc_, seg_c_, seg_b_, int_lo_, int_hi_;
  std::vector<float> seg_t_pad_, seg_zc_pad_, seg_c_t_, seg_b_t_;
  ModelView view_;
};

class PrototypeSet {
 public:
  // prototypes: [n_proto, d]; each is centred and L2-normalised here (kernels are compared after the same
  // normalisation).  Throws std::invalid_argument for a flat, zero or non-finite prototype.
  PrototypeSet(int d, int n_proto, const float* prototypes);
  const PrototypeView& view() const { return view_; }
  const std::vector<float>& normalized() const { return normalized_; }

 private:
  PackedLayer layer_;
  std::vector<float> normalized_;
  PrototypeView view_;
};

// Upper bound on decoder segments; a decoder with more falls back to the MLP (never seen in practice).
constexpr int kMaxSegments = 1 << 16;

}  // namespace kernelatlas
