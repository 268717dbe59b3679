// Arguments of the CUDA module (cuda/module.cu) and the CPU harness (cuda/harness.cpp): the model arguments
// every extension shares (cpp/src/bindings_model.h: layers, decoder, threshold, min_abs) and the GPU's own
// (precision, recheck margins).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <limits>
#include <string>
#include <vector>

#include "bindings_model.h"

namespace kernelatlas {
namespace gpu {

namespace py = pybind11;

using bindings::layers_arg;
using bindings::min_abs_arg;
using bindings::threshold_arg;
using bindings::use_segments_arg;

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
