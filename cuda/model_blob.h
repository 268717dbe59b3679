// Host side of the GPU model formats (cuda/ops/common.cuh): an AutoencoderModel / PrototypeSet, built and
// validated by the CPU engine's own code (cpp/src/model.cpp), flattened into one float array and a GpuModel of
// offsets.  The weights are the CPU engine's packed arrays, copied as they are: both backends read the same
// numbers in the same layout.  Used by the CUDA module (uploaded once per model) and by the CPU harness.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernelatlas/model.h"
#include "ops/common.cuh"

namespace kernelatlas {
namespace gpu {

struct ModelBlob {
  GpuModel m;
  std::vector<float> floats;
};

struct PrototypeBlob {
  GpuPrototypes p;
  std::vector<float> floats;
};

namespace detail {
inline int32_t append(std::vector<float>& blob, const float* src, int64_t n) {
  const int64_t at = static_cast<int64_t>(blob.size());
  if (at + n > INT32_MAX) throw std::invalid_argument("the model is too large for the CUDA backend (2^31 floats)");
  blob.insert(blob.end(), src, src + n);
  return static_cast<int32_t>(at);
}

inline GpuLayer append_layer(std::vector<float>& blob, const LayerView& L) {
  GpuLayer g{};
  g.in = L.in;
  g.out = L.out;
  g.out_pad = L.out_pad;
  g.block = L.block;
  g.act = static_cast<int32_t>(L.act);
  g.w = append(blob, L.w, static_cast<int64_t>(L.out_pad) * L.in);
  g.b = append(blob, L.b, L.out_pad);
  if (L.block != 1 && L.block != kBlockOut)
    throw std::logic_error("packed layer block " + std::to_string(L.block) + " is not 1 or kBlockOut");
  return g;
}
}  // namespace detail

inline ModelBlob model_blob(const ModelView& v) {
  ModelBlob out;
  GpuModel& m = out.m;
  std::vector<float>& blob = out.floats;
  m.d = v.d;
  m.n_enc = v.n_enc;
  m.n_dec = v.n_dec;
  m.n_int = v.n_int;
  m.int_lo = detail::append(blob, v.int_lo, v.n_int);
  m.int_hi = detail::append(blob, v.int_hi, v.n_int);
  for (int i = 0; i < v.n_enc; ++i) {
    m.enc[i] = detail::append_layer(blob, v.enc[i]);
    if (m.enc[i].out_pad > m.enc_width) m.enc_width = m.enc[i].out_pad;
  }
  m.floats_enc = static_cast<int32_t>(blob.size());
  m.n_seg = v.n_seg;
  if (v.n_seg > 0) {
    m.seg_t = detail::append(blob, v.seg_t, v.n_seg - 1);
    m.seg_zc = detail::append(blob, v.seg_zc, v.n_seg);
    m.seg_c = detail::append(blob, v.seg_c, static_cast<int64_t>(v.n_seg) * v.d);
    m.seg_b = detail::append(blob, v.seg_b, static_cast<int64_t>(v.n_seg) * v.d);
  }
  m.floats_table = static_cast<int32_t>(blob.size());
  for (int i = 0; i < v.n_dec; ++i) {
    m.dec[i] = detail::append_layer(blob, v.dec[i]);
    if (m.dec[i].out_pad > m.dec_width) m.dec_width = m.dec[i].out_pad;
  }
  m.floats_all = static_cast<int32_t>(blob.size());
  if (blob.empty()) blob.push_back(0.f);  // never an empty allocation
  return out;
}

inline PrototypeBlob prototype_blob(const PrototypeSet& set) {
  PrototypeBlob out;
  out.p.d = set.view().d;
  out.p.n_proto = set.view().n_proto;
  out.floats = set.normalized();  // [n_proto, d], row-major
  out.p.floats_all = static_cast<int32_t>(out.floats.size());
  return out;
}

}  // namespace gpu
}  // namespace kernelatlas
