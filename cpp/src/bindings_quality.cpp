// kernelatlas._core: the per-layer statistics (layer_stats, coef_range, coef_histograms).  Same rules as
// bindings.cpp: every array is checked here with an error that names the fix, the kernels are never copied
// (small parameters -- mean, basis, ranges -- are converted to float64 when needed), and the GIL is released
// around the passes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "bindings_args.h"
#include "kernelatlas/quality.h"
#include "kernelatlas/types.h"

namespace py = pybind11;
using namespace kernelatlas;
using namespace kernelatlas::bindings;

namespace {

// A small float64 parameter of the given shape (converted from any real dtype; it is never large), all finite.
py::array_t<double> param_arg(const py::handle& obj, std::vector<py::ssize_t> shape, const char* name,
                              const char* what) {
  auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a) throw py::type_error(std::string(name) + " must be an array of real numbers (" + what + ")");
  require_shape(a, shape, name, std::string(" (") + what + ")");
  const double* p = a.data();
  for (py::ssize_t i = 0; i < a.size(); ++i)
    if (!std::isfinite(p[i])) throw py::value_error(std::string(name) + " must be finite (" + what + ")");
  return a;
}

// mean [d] and basis [n_components, d]; returns n_components.
int projection_args(const py::handle& mean, const py::handle& basis, int d, py::array_t<double>& mean_a,
                    py::array_t<double>& basis_a) {
  auto b = py::array::ensure(basis);
  if (!b || b.ndim() != 2) throw py::value_error("basis must be 2-D [n_components, d] (PCA components as rows)");
  const auto nc = b.shape(0);
  if (nc < 1 || nc > kMaxDim)
    throw py::value_error("basis must have 1.." + std::to_string(kMaxDim) + " components (rows), got " +
                          std::to_string(nc));
  basis_a = param_arg(basis, {nc, d}, "basis", "PCA components as rows, one entry per kernel entry");
  mean_a = param_arg(mean, {d}, "mean", "the PCA mean, one entry per kernel entry");
  return static_cast<int>(nc);
}

int threads_arg(int threads) {
  if (threads < 0)
    throw py::value_error("threads must be >= 0 (0 = all OpenMP threads), got " + std::to_string(threads));
  return threads;
}

}  // namespace

void bind_quality(py::module_& m) {
  m.def(
      "layer_stats",
      [](const py::array& x, const py::array& starts, const py::array& stops, int threads) {
        const KernelsIn in = kernels_arg(x, -1, "x");
        const py::ssize_t segs = segments_arg(starts, stops, in.rows);
        threads = threads_arg(threads);
        const py::ssize_t d = in.d;
        py::array_t<int64_t> n({segs}), nonfinite({segs}), zeros({segs}), sparse({segs});
        py::array_t<double> max_abs({segs}), sum({segs, d}), gram({segs, d, d}), sum_scaled({segs, d}),
            gram_scaled({segs, d, d}), sum_sparse({segs, d}), gram_sparse({segs, d, d});
        LayerStatsOut out;
        out.n = n.mutable_data();
        out.nonfinite = nonfinite.mutable_data();
        out.zeros = zeros.mutable_data();
        out.sparse = sparse.mutable_data();
        out.max_abs = max_abs.mutable_data();
        out.sum = sum.mutable_data();
        out.gram = gram.mutable_data();
        out.sum_scaled = sum_scaled.mutable_data();
        out.gram_scaled = gram_scaled.mutable_data();
        out.sum_sparse = sum_sparse.mutable_data();
        out.gram_sparse = gram_sparse.mutable_data();
        const auto* s0 = static_cast<const int64_t*>(starts.data());
        const auto* s1 = static_cast<const int64_t*>(stops.data());
        {
          py::gil_scoped_release release;
          kernelatlas::layer_stats(in, s0, s1, segs, out, threads);
        }
        py::dict result;
        result["n"] = n;
        result["nonfinite"] = nonfinite;
        result["zeros"] = zeros;
        result["sparse"] = sparse;
        result["max_abs"] = max_abs;
        result["sum"] = sum;
        result["gram"] = gram;
        result["sum_scaled"] = sum_scaled;
        result["gram_scaled"] = gram_scaled;
        result["sum_sparse"] = sum_sparse;
        result["gram_sparse"] = gram_sparse;
        return result;
      },
      py::arg("x"), py::arg("starts"), py::arg("stops"), py::kw_only(), py::arg("threads") = 0,
      "Per-segment (layer) statistics of the kernels x[starts[j]:stops[j]] -> dict of arrays: n, nonfinite, "
      "zeros, sparse (int64 [L]), max_abs (float64 [L]), sum [L, d], gram [L, d, d], sum_scaled, gram_scaled "
      "(rows divided by their own max|w|), sum_sparse [L, d], gram_sparse [L, d, d] (the raw moments of the "
      "sparse rows alone, float64).  Rows with any NaN/Inf count only in nonfinite.  A row is sparse "
      "when every |w| < 0.01 * the segment's max_abs (CNN Filter DB); when max_abs is 0 every finite row is.");

  m.def(
      "coef_range",
      [](const py::array& x, const py::array& starts, const py::array& stops, const py::object& mean,
         const py::object& basis, bool scale_maxabs, int threads) {
        const KernelsIn in = kernels_arg(x, -1, "x");
        const py::ssize_t segs = segments_arg(starts, stops, in.rows);
        threads = threads_arg(threads);
        py::array_t<double> mean_a, basis_a;
        const int nc = projection_args(mean, basis, in.d, mean_a, basis_a);
        py::array_t<double> lo({static_cast<py::ssize_t>(nc)}), hi({static_cast<py::ssize_t>(nc)});
        const double *mu = mean_a.data(), *b = basis_a.data();
        double *l = lo.mutable_data(), *h = hi.mutable_data();
        const auto* s0 = static_cast<const int64_t*>(starts.data());
        const auto* s1 = static_cast<const int64_t*>(stops.data());
        {
          py::gil_scoped_release release;
          kernelatlas::coef_range(in, s0, s1, segs, mu, b, nc, scale_maxabs, l, h, threads);
        }
        return py::make_tuple(lo, hi);
      },
      py::arg("x"), py::arg("starts"), py::arg("stops"), py::arg("mean"), py::arg("basis"), py::kw_only(),
      py::arg("scale_maxabs") = true, py::arg("threads") = 0,
      "Min and max per component of c = basis @ (w' - mean) over the finite rows of all segments (w' = w / "
      "max|w| when scale_maxabs; all-zero rows unchanged) -> (lo, hi) float64 [n_components]; +inf / -inf "
      "when there are no finite rows.");

  m.def(
      "coef_histograms",
      [](const py::array& x, const py::array& starts, const py::array& stops, const py::array& groups, int n_groups,
         const py::object& mean, const py::object& basis, const py::object& lo, const py::object& hi, int bins,
         bool scale_maxabs, int threads) {
        const KernelsIn in = kernels_arg(x, -1, "x");
        const py::ssize_t segs = segments_arg(starts, stops, in.rows);
        threads = threads_arg(threads);
        if (groups.dtype().kind() != 'i' || groups.itemsize() != 4 || groups.ndim() != 1 || !is_c_contiguous(groups) ||
            !is_native_byte_order(groups))
          throw py::type_error("groups must be a C-contiguous 1-D int32 array, got " + dtype_str(groups) + " " +
                               shape_str(groups) + ": use np.ascontiguousarray(groups, dtype=np.int32)");
        if (groups.shape(0) != segs)
          throw py::value_error("groups must have one entry per segment (" + std::to_string(segs) + "), got " +
                                shape_str(groups));
        if (n_groups < 0) throw py::value_error("n_groups must be >= 0, got " + std::to_string(n_groups));
        const auto* g = static_cast<const int32_t*>(groups.data());
        for (py::ssize_t j = 0; j < segs; ++j)
          if (g[j] < -1 || g[j] >= n_groups)
            throw py::value_error("groups[" + std::to_string(j) + "] = " + std::to_string(g[j]) + " is outside -1.." +
                                  std::to_string(n_groups - 1) + " (-1 skips a segment)");
        if (bins < 1 || bins > (1 << 20))
          throw py::value_error("bins must be in 1..1048576, got " + std::to_string(bins));
        py::array_t<double> mean_a, basis_a;
        const int nc = projection_args(mean, basis, in.d, mean_a, basis_a);
        const auto lo_a = param_arg(lo, {nc}, "lo", "the histogram range's lower end per component");
        const auto hi_a = param_arg(hi, {nc}, "hi", "the histogram range's upper end per component");
        for (int c = 0; c < nc; ++c)
          if (!(hi_a.data()[c] > lo_a.data()[c]))
            throw py::value_error("hi must be > lo for every component; component " + std::to_string(c) + " has lo " +
                                  std::to_string(lo_a.data()[c]) + ", hi " + std::to_string(hi_a.data()[c]) +
                                  " (widen a constant range, e.g. from coef_range, before binning)");
        py::array_t<int64_t> hist(
            {static_cast<py::ssize_t>(n_groups), static_cast<py::ssize_t>(nc), static_cast<py::ssize_t>(bins)});
        const double *mu = mean_a.data(), *b = basis_a.data(), *l = lo_a.data(), *h = hi_a.data();
        int64_t* out = hist.mutable_data();
        const auto* s0 = static_cast<const int64_t*>(starts.data());
        const auto* s1 = static_cast<const int64_t*>(stops.data());
        {
          py::gil_scoped_release release;
          kernelatlas::coef_histograms(in, s0, s1, g, segs, n_groups, mu, b, nc, l, h, bins, scale_maxabs, out,
                                       threads);
        }
        return hist;
      },
      py::arg("x"), py::arg("starts"), py::arg("stops"), py::arg("groups"), py::arg("n_groups"), py::arg("mean"),
      py::arg("basis"), py::arg("lo"), py::arg("hi"), py::kw_only(), py::arg("bins") = 70,
      py::arg("scale_maxabs") = true, py::arg("threads") = 0,
      "Histograms of c = basis @ (w' - mean) per group and component -> int64 [n_groups, n_components, bins]. "
      "Segment j's finite rows count for group groups[j] (-1: skipped); bin = floor((c - lo) / (hi - lo) * "
      "bins) clamped into [0, bins - 1], so values outside [lo, hi] land in the edge bins.");

  m.def(
      "orthogonality",
      [](const py::array& filters, int threads) {
        const char kind = filters.dtype().kind();
        KernelsIn in;
        if (kind == 'f' && filters.itemsize() == 4) {
          in.dtype = DType::float32;
        } else if (kind == 'f' && filters.itemsize() == 2) {
          in.dtype = DType::float16;
        } else {
          throw py::type_error("filters must be float32 or float16, got " + dtype_str(filters) +
                               ": convert it with filters.astype(np.float32)");
        }
        require_native_byte_order(filters, "filters", in.dtype == DType::float32 ? "np.float32" : "np.float16");
        if (filters.ndim() != 2)
          throw py::value_error("filters must be 2-D [c_out, c_in/groups * k * k], got " + shape_str(filters) +
                                ": reshape it with filters.reshape(len(filters), -1)");
        if (!is_c_contiguous(filters))
          throw py::value_error(
              "filters is not C-contiguous (a transposed view or strided slice?): pass "
              "np.ascontiguousarray(filters); kernelatlas never copies large inputs silently");
        if (filters.shape(0) > 0 && filters.shape(1) < 1)
          throw py::value_error("filters must have at least one entry per filter, got " + shape_str(filters));
        in.data = filters.data();
        in.rows = filters.shape(0);
        in.d = int_extent(filters.shape(1), std::numeric_limits<int>::max(), "entries per filter");
        threads = threads_arg(threads);
        idx_t count = 0;
        double value = 0.0;
        {
          py::gil_scoped_release release;
          value = kernelatlas::orthogonality(in, &count, threads);
        }
        return value;
      },
      py::arg("filters"), py::kw_only(), py::arg("threads") = 0,
      "Orthogonality of one layer (CVPRW 2022) from its filters [c_out, m], float32 or float16: filters with a "
      "NaN/Inf entry left out, the others L2-normalised (all-zero ones stay zero), 1 - sum|F F^T - I| / "
      "(c (c - 1)) over the c finite filters; NaN below two.  Gram entries are fp32 sums of the float32-rounded "
      "unit rows (error ~1e-7 per entry, see kernelatlas/quality.h); holds c x m float32.");
}
