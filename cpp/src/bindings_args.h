// Argument checks shared by the binding files (bindings.cpp, bindings_quality.cpp): dtype, shape,
// C-contiguity and ranges, each failure with an error that names the fix.  Nothing here copies an array.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "kernelatlas/types.h"

namespace kernelatlas::bindings {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline bool is_c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

// Whether a's elements are in this machine's byte order ('=' native, '|' single bytes, or the explicit order
// that equals the native one).  A '>f4' array (from a big-endian file or np.dtype('>f4')) holds the same values
// as '<f4' in swapped bytes: read as native it gives garbage, so every array the engine reads raw is checked.
inline bool is_native_byte_order(const py::array& a) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  constexpr char kForeign = '<';
#else
  constexpr char kForeign = '>';
#endif
  return a.dtype().byteorder() != kForeign;
}

inline void require_native_byte_order(const py::array& a, const std::string& name, const std::string& astype) {
  if (!is_native_byte_order(a))
    throw py::type_error(name + " is stored in the non-native byte order (dtype " + dtype_str(a) +
                         "); the engine reads native numbers: convert it with " + name + ".astype(" + astype + ")");
}

// An extent of an array that the engine takes as an int: checked on the 64-bit value before any cast, so that
// 2**32 + 9 columns is refused rather than read as 9.
inline int int_extent(py::ssize_t v, py::ssize_t max, const std::string& what) {
  if (v < 0 || v > max)
    throw py::value_error(what + " is " + std::to_string(v) + "; the engine takes at most " + std::to_string(max));
  return static_cast<int>(v);
}

// Throws "NAME must have shape (a, b)DETAIL, got (c, d)" unless a's shape is exactly ``shape``.
inline void require_shape(const py::array& a, const std::vector<py::ssize_t>& shape, const std::string& name,
                          const std::string& detail = "") {
  bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
  if (same) return;
  std::ostringstream os;
  os << name << " must have shape (";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")") << detail << ", got " << shape_str(a);
  throw py::value_error(os.str());
}

inline std::string kernel_size_name(int d) {
  const int k = static_cast<int>(std::lround(std::sqrt(static_cast<double>(d))));
  if (k * k == d) return std::to_string(k) + "x" + std::to_string(k);
  return std::to_string(d) + " entries";
}

// A batch of kernels: float32/float16, C-contiguous, [n, d] or [n, k, k].  expected_d < 0: any d.
inline KernelsIn kernels_arg(const py::array& x, int expected_d, const char* name) {
  const char kind = x.dtype().kind();
  const auto itemsize = x.itemsize();
  KernelsIn in;
  if (kind == 'f' && itemsize == 4) {
    in.dtype = DType::float32;
  } else if (kind == 'f' && itemsize == 2) {
    in.dtype = DType::float16;
  } else {
    throw py::type_error(std::string(name) + " must be float32 or float16, got " + dtype_str(x) + ": convert it with " +
                         name + ".astype(np.float32)");
  }
  require_native_byte_order(x, name, in.dtype == DType::float32 ? "np.float32" : "np.float16");
  // entries per kernel, computed and range-checked in 64 bits (a column count past 2**31 must not wrap)
  py::ssize_t d64 = 0;
  if (x.ndim() == 2) {
    d64 = x.shape(1);
  } else if (x.ndim() == 3 && x.shape(1) == x.shape(2)) {
    d64 = x.shape(1) <= kMaxDim ? x.shape(1) * x.shape(2) : x.shape(1);  // k > kMaxDim is refused below either way
  } else {
    throw py::value_error(std::string(name) + " must have shape [n, k*k] or [n, k, k], got " + shape_str(x) +
                          ": reshape it with " + name + ".reshape(len(" + name + "), -1)");
  }
  if (d64 < 1 || d64 > kMaxDim)
    throw py::value_error(std::string(name) + " has " + std::to_string(d64) + " entries per kernel (shape " +
                          shape_str(x) + "); the engine takes 1.." + std::to_string(kMaxDim) +
                          " (3x3, 5x5, 7x7 kernels are 9, 25, 49)");
  const int d = static_cast<int>(d64);
  if (expected_d >= 0 && d != expected_d)
    throw py::value_error(std::string(name) + " holds " + kernel_size_name(d) + " kernels but the model is for " +
                          kernel_size_name(expected_d) + " kernels: use the model trained for this kernel size");
  if (!is_c_contiguous(x))
    throw py::value_error(std::string(name) +
                          " is not C-contiguous (a transposed view or strided slice?): pass "
                          "np.ascontiguousarray(" +
                          name + "); kernelatlas never copies large inputs silently");
  in.data = x.data();
  in.rows = x.shape(0);
  in.d = d;
  return in;
}

// starts/stops: C-contiguous int64 [L], 0 <= start <= stop <= n.  Returns L.
inline py::ssize_t segments_arg(const py::array& starts, const py::array& stops, idx_t n) {
  const auto need_int64 = [](const py::array& a, const char* name) {
    if (a.dtype().kind() != 'i' || a.itemsize() != 8 || a.ndim() != 1 || !is_c_contiguous(a) ||
        !is_native_byte_order(a))
      throw py::type_error(std::string(name) + " must be a C-contiguous 1-D int64 array, got " + dtype_str(a) + " " +
                           shape_str(a) + ": use np.ascontiguousarray(" + name + ", dtype=np.int64)");
  };
  need_int64(starts, "starts");
  need_int64(stops, "stops");
  if (starts.shape(0) != stops.shape(0))
    throw py::value_error("starts and stops must have the same length, got " + shape_str(starts) + " and " +
                          shape_str(stops));
  const auto* s0 = static_cast<const int64_t*>(starts.data());
  const auto* s1 = static_cast<const int64_t*>(stops.data());
  for (py::ssize_t j = 0; j < starts.shape(0); ++j)
    if (s0[j] < 0 || s1[j] < s0[j] || s1[j] > n)
      throw py::value_error("segment " + std::to_string(j) + " [" + std::to_string(s0[j]) + ", " +
                            std::to_string(s1[j]) + ") is not a range of the " + std::to_string(n) +
                            " rows: segments need 0 <= start <= stop <= len(x)");
  return starts.shape(0);
}

}  // namespace kernelatlas::bindings
