// Model arguments shared by the CUDA module (cuda/module.cu) and the CPU harness (cuda/harness.cpp): the
// autoencoder's layers as (weight [out, in], bias [out], activation) tuples -- the format _core's
// AutoencoderEngine takes (python/kernelatlas/autoencoder.py) -- turned into the CPU engine's validated model.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <limits>
#include <string>
#include <vector>

#include "bindings_args.h"
#include "kernelatlas/model.h"

namespace kernelatlas {
namespace gpu {

namespace py = pybind11;

inline std::vector<DenseSpec> layers_arg(const py::list& layers, const char* side) {
  std::vector<DenseSpec> out;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto t = layers[i].cast<py::tuple>();
    const std::string where = std::string(side) + " layer " + std::to_string(i);
    if (t.size() != 3) throw py::value_error(where + " must be (weight, bias, activation)");
    auto w = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(t[0]);
    auto b = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(t[1]);
    if (!w || w.ndim() != 2) throw py::value_error(where + ": weight must be 2-D [out, in]");
    if (!b || b.ndim() != 1) throw py::value_error(where + ": bias must be 1-D [out]");
    DenseSpec s;
    s.out = bindings::int_extent(w.shape(0), std::numeric_limits<int>::max(), where + "'s output width");
    s.in = bindings::int_extent(w.shape(1), std::numeric_limits<int>::max(), where + "'s input width");
    s.act = parse_activation(t[2].cast<std::string>());
    s.weight.assign(w.data(), w.data() + w.size());
    s.bias.assign(b.data(), b.data() + b.size());
    out.push_back(std::move(s));
  }
  return out;
}

inline bool use_segments_arg(const AutoencoderModel& m, const std::string& decoder) {
  if (decoder == "auto") return m.piecewise_linear();
  if (decoder == "mlp") return false;
  if (decoder == "segments") {
    if (!m.piecewise_linear())
      throw py::value_error(
          "decoder='segments' needs a decoder whose activations are all relu/identity; use decoder='auto' or 'mlp'");
    return true;
  }
  throw py::value_error("decoder must be 'auto', 'segments' or 'mlp', got '" + decoder + "'");
}

inline float threshold_arg(double threshold) {
  if (!(threshold >= -1.0 && threshold <= 1.0))
    throw py::value_error("threshold must be a cosine in [-1, 1], got " + std::to_string(threshold));
  return static_cast<float>(threshold);
}

inline float min_abs_arg(double min_abs) {
  if (!(min_abs >= 0.0) || min_abs > std::numeric_limits<double>::max())
    throw py::value_error("min_abs must be finite and >= 0 (0 = only exact zeros are dead), got " +
                          std::to_string(min_abs));
  return static_cast<float>(min_abs);
}

// precision='fp32' (exact, the default) or 'tf32' (the first encoder layer by tensor-core mma): whether TF32.
inline bool tf32_arg(const std::string& precision) {
  if (precision == "fp32") return false;
  if (precision == "tf32") return true;
  throw py::value_error("precision on the GPU must be 'fp32' or 'tf32', got '" + precision + "'");
}

// A recheck margin of precision='tf32' (>= 0, finite; 0 rechecks nothing).
inline float margin_arg(double margin, const char* name) {
  if (!(margin >= 0.0) || margin > 1e30)
    throw py::value_error(std::string(name) + " must be finite and >= 0, got " + std::to_string(margin));
  return static_cast<float>(margin);
}

}  // namespace gpu
}  // namespace kernelatlas
