// The model arguments every extension takes the same way -- _core (bindings.cpp), the CUDA module
// (cuda/module.cu) and the CPU harness of the CUDA kernels (cuda/harness.cpp): the autoencoder's layers as
// (weight [out, in], bias [out], activation) tuples (the format python/kernelatlas/autoencoder.py passes),
// the decoder choice, the threshold and min_abs, each refused with an error that names the fix.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "bindings_args.h"
#include "kernelatlas/model.h"

namespace kernelatlas::bindings {

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
    // a bound only against narrowing: the model checks widths against kMaxWidth with its own message
    s.out = int_extent(w.shape(0), std::numeric_limits<int>::max(), where + "'s output width");
    s.in = int_extent(w.shape(1), std::numeric_limits<int>::max(), where + "'s input width");
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
  if (!std::isfinite(threshold) || threshold < -1.0 || threshold > 1.0)
    throw py::value_error("threshold must be a cosine in [-1, 1], got " + std::to_string(threshold));
  return static_cast<float>(threshold);
}

inline float min_abs_arg(double min_abs) {
  if (!std::isfinite(min_abs) || min_abs < 0.0)
    throw py::value_error("min_abs must be finite and >= 0 (0 = only exact zeros are dead), got " +
                          std::to_string(min_abs));
  return static_cast<float>(min_abs);
}

}  // namespace kernelatlas::bindings
