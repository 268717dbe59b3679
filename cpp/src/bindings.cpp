// kernelatlas._core: the boundary between Python and the engine.  Every array is checked here (dtype, shape,
// C-contiguity, writeability of outputs) with an error that names the fix; nothing is ever copied silently,
// and the GIL is released around all heavy work.  Inputs may be numpy arrays or memmaps of any size.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "bindings_args.h"
#include "bindings_model.h"
#include "kernelatlas/engine.h"
#include "kernelatlas/model.h"
#include "parallel.h"

namespace py = pybind11;
using namespace kernelatlas;
using namespace kernelatlas::bindings;

void bind_quality(py::module_& m);  // bindings_quality.cpp

namespace {

// An output array: exact dtype, exact shape, C-contiguous, writeable -- or a freshly allocated one.
template <class T>
py::array_t<T> out_arg(const std::optional<py::array>& out, const std::vector<py::ssize_t>& shape, const char* name) {
  if (!out) return py::array_t<T>(shape);
  const py::array& a = *out;
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must be " + py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                         dtype_str(a));
  require_shape(a, shape, name);
  if (!is_c_contiguous(a)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (!a.writeable())
    throw py::value_error(std::string(name) + " is read-only: open an output memmap with mode 'r+' or 'w+'");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

template <class T>
py::array_t<T> vec_to_array(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

Precision precision_arg(const std::string& name) {
  if (name == "fp32") return Precision::fp32;
  if (name == "bf16") return Precision::bf16;
  throw py::value_error("precision must be 'fp32' or 'bf16', got '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kernelatlas native CPU engine (private; use the kernelatlas package)";

  // No exception translator of our own: pybind11 already raises ValueError for std::invalid_argument (the
  // engine's "bad argument" errors) and RuntimeError for std::runtime_error.
  m.def(
      "normalize",
      [](const py::array& x, std::optional<py::array> out, std::optional<py::array> norms, double min_abs,
         int threads) {
        const KernelsIn in = kernels_arg(x, -1, "x");
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        auto out_a = out_arg<float>(out, shape, "out");
        auto norms_a = out_arg<float>(norms, {static_cast<py::ssize_t>(in.rows)}, "norms");
        const float ma = min_abs_arg(min_abs);
        float* o = out_a.mutable_data();
        float* nr = norms_a.mutable_data();
        {
          py::gil_scoped_release release;
          kernelatlas::normalize(in, ma, o, nr, threads);
        }
        return py::make_tuple(out_a, norms_a);
      },
      py::arg("x"), py::kw_only(), py::arg("out") = py::none(), py::arg("norms") = py::none(), py::arg("min_abs") = 0.0,
      py::arg("threads") = 0, "Centre each kernel and divide by its L2 norm -> (normalized float32, norms float32).");

  py::class_<AutoencoderModel>(m, "AutoencoderEngine")
      .def(py::init([](int d, const py::list& encoder, const py::list& decoder, std::vector<float> lo,
                       std::vector<float> hi) {
             return new AutoencoderModel(d, layers_arg(encoder, "encoder"), layers_arg(decoder, "decoder"),
                                         std::move(lo), std::move(hi));
           }),
           py::arg("d"), py::arg("encoder"), py::arg("decoder"), py::arg("intervals_lo") = std::vector<float>{},
           py::arg("intervals_hi") = std::vector<float>{})
      .def_property_readonly("d", &AutoencoderModel::d)
      .def_property_readonly("piecewise_linear", &AutoencoderModel::piecewise_linear)
      .def_property_readonly("n_segments", &AutoencoderModel::n_segments)
      .def(
          "segments",
          [](const AutoencoderModel& self) {
            const auto n = static_cast<py::ssize_t>(self.n_segments());
            py::dict out;
            out["breakpoints"] = vec_to_array(self.seg_t(), {std::max<py::ssize_t>(n - 1, 0)});
            out["centers"] = vec_to_array(self.seg_zc(), {n});
            out["values"] = vec_to_array(self.seg_c(), {n, self.d()});
            out["slopes"] = vec_to_array(self.seg_b(), {n, self.d()});
            return out;
          },
          "The piecewise-linear decoder table (segment s decodes z to values[s] + (z - centers[s]) * slopes[s]).")
      .def(
          "encode",
          [](const AutoencoderModel& self, const py::array& x, std::optional<py::array> out, double min_abs,
             int threads, const std::string& precision) {
            const KernelsIn in = kernels_arg(x, self.d(), "x");
            const Precision prec = precision_arg(precision);
            auto codes = out_arg<float>(out, {static_cast<py::ssize_t>(in.rows)}, "out");
            const float ma = min_abs_arg(min_abs);
            float* c = codes.mutable_data();
            {
              py::gil_scoped_release release;
              kernelatlas::encode(self.view(), in, ma, c, threads, prec);
            }
            return codes;
          },
          py::arg("x"), py::kw_only(), py::arg("out") = py::none(), py::arg("min_abs") = 0.0, py::arg("threads") = 0,
          py::arg("precision") = "fp32")
      .def(
          "decode",
          [](const AutoencoderModel& self, const py::array& codes, std::optional<py::array> out, int threads) {
            if (codes.ndim() != 1) throw py::value_error("codes must be 1-D [n], got shape " + shape_str(codes));
            if (!codes.dtype().is(py::dtype::of<float>()))
              throw py::type_error("codes must be float32, got " + dtype_str(codes) + ": use codes.astype(np.float32)");
            if (!is_c_contiguous(codes))
              throw py::value_error("codes must be C-contiguous: pass np.ascontiguousarray(codes)");
            const idx_t n = codes.shape(0);
            auto dec = out_arg<float>(out, {static_cast<py::ssize_t>(n), self.d()}, "out");
            const float* z = static_cast<const float*>(codes.data());
            float* o = dec.mutable_data();
            {
              py::gil_scoped_release release;
              kernelatlas::decode(self.view(), z, n, o, threads);
            }
            return dec;
          },
          py::arg("codes"), py::kw_only(), py::arg("out") = py::none(), py::arg("threads") = 0)
      .def(
          "reconstruct",
          [](const AutoencoderModel& self, const py::array& x, std::optional<py::array> out, double min_abs,
             int threads) {
            const KernelsIn in = kernels_arg(x, self.d(), "x");
            auto dec = out_arg<float>(out, {static_cast<py::ssize_t>(in.rows), self.d()}, "out");
            const float ma = min_abs_arg(min_abs);
            float* o = dec.mutable_data();
            {
              py::gil_scoped_release release;
              kernelatlas::reconstruct(self.view(), in, ma, o, threads);
            }
            return dec;
          },
          py::arg("x"), py::kw_only(), py::arg("out") = py::none(), py::arg("min_abs") = 0.0, py::arg("threads") = 0)
      .def(
          "assign",
          [](const AutoencoderModel& self, const py::array& x, double threshold, std::optional<py::array> labels,
             std::optional<py::array> scores, std::optional<py::array> codes, double min_abs, int threads,
             const std::string& decoder, const std::string& precision, double recheck_code, double recheck_score) {
            const KernelsIn in = kernels_arg(x, self.d(), "x");
            const Precision prec = precision_arg(precision);
            if (!(recheck_code >= 0 && recheck_score >= 0 && std::isfinite(recheck_code) &&
                  std::isfinite(recheck_score)))
              throw py::value_error("recheck margins must be finite and >= 0");
            const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(in.rows)};
            auto lab = out_arg<int16_t>(labels, shape, "labels");
            auto sc = out_arg<float>(scores, shape, "scores");
            auto cd = out_arg<float>(codes, shape, "codes");
            const float thr = threshold_arg(threshold), ma = min_abs_arg(min_abs);
            const bool seg = use_segments_arg(self, decoder);
            int16_t* l = lab.mutable_data();
            float* s = sc.mutable_data();
            float* c = cd.mutable_data();
            {
              py::gil_scoped_release release;
              kernelatlas::assign(self.view(), in, thr, ma, seg, l, s, c, threads, prec,
                                  static_cast<float>(recheck_code), static_cast<float>(recheck_score));
            }
            return py::make_tuple(lab, sc, cd);
          },
          py::arg("x"), py::kw_only(), py::arg("threshold") = 0.85, py::arg("labels") = py::none(),
          py::arg("scores") = py::none(), py::arg("codes") = py::none(), py::arg("min_abs") = 0.0,
          py::arg("threads") = 0, py::arg("decoder") = "auto", py::arg("precision") = "fp32",
          py::arg("recheck_code") = 0.0, py::arg("recheck_score") = 0.0);

  py::class_<PrototypeSet>(m, "PrototypeEngine")
      .def(py::init([](const py::array& prototypes) {
             if (prototypes.ndim() != 2 || !prototypes.dtype().is(py::dtype::of<float>()) ||
                 !is_c_contiguous(prototypes))
               throw py::value_error("prototypes must be a C-contiguous float32 array [n_prototypes, k*k], got " +
                                     dtype_str(prototypes) + " " + shape_str(prototypes));
             if (prototypes.shape(0) > kMaxPrototypes)  // before the cast to int; PrototypeSet checks the rest
               throw py::value_error("need 1.." + std::to_string(kMaxPrototypes) + " prototypes, got " +
                                     std::to_string(prototypes.shape(0)));
             return new PrototypeSet(int_extent(prototypes.shape(1), kMaxDim, "the prototype size (entries per row)"),
                                     static_cast<int>(prototypes.shape(0)),
                                     static_cast<const float*>(prototypes.data()));
           }),
           py::arg("prototypes"))
      .def_property_readonly("d", [](const PrototypeSet& p) { return p.view().d; })
      .def_property_readonly("n_prototypes", [](const PrototypeSet& p) { return p.view().n_proto; })
      .def_property_readonly(
          "normalized",
          [](const PrototypeSet& p) { return vec_to_array(p.normalized(), {p.view().n_proto, p.view().d}); })
      .def(
          "assign",
          [](const PrototypeSet& self, const py::array& x, double threshold, std::optional<py::array> labels,
             std::optional<py::array> scores, double min_abs, int threads) {
            const KernelsIn in = kernels_arg(x, self.view().d, "x");
            const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(in.rows)};
            auto lab = out_arg<int16_t>(labels, shape, "labels");
            auto sc = out_arg<float>(scores, shape, "scores");
            const float thr = threshold_arg(threshold), ma = min_abs_arg(min_abs);
            int16_t* l = lab.mutable_data();
            float* s = sc.mutable_data();
            {
              py::gil_scoped_release release;
              kernelatlas::assign_prototypes(self.view(), in, thr, ma, l, s, threads);
            }
            return py::make_tuple(lab, sc);
          },
          py::arg("x"), py::kw_only(), py::arg("threshold"), py::arg("labels") = py::none(),
          py::arg("scores") = py::none(), py::arg("min_abs") = 0.0, py::arg("threads") = 0);

  m.def(
      "label_counts",
      [](const py::array& labels, const py::array& values, const py::array& starts, const py::array& stops,
         int n_labels, bool nan_is_dead, int threads) {
        auto need = [](const py::array& a, char kind, py::ssize_t itemsize, const char* name, const char* dt) {
          if (a.dtype().kind() != kind || a.itemsize() != itemsize || a.ndim() != 1 || !is_c_contiguous(a) ||
              !is_native_byte_order(a))
            throw py::type_error(std::string(name) + " must be a C-contiguous 1-D " + dt + " array, got " +
                                 dtype_str(a) + " " + shape_str(a));
        };
        need(labels, 'i', 2, "labels", "int16");
        need(values, 'f', 4, "values", "float32");
        if (values.shape(0) != labels.shape(0))
          throw py::value_error("labels and values must have the same length, got " + shape_str(labels) + " and " +
                                shape_str(values));
        if (n_labels < 0 || n_labels > 32767) throw py::value_error("n_labels must be in 0..32767");
        const py::ssize_t segs = segments_arg(starts, stops, labels.shape(0));
        const auto* s0 = static_cast<const int64_t*>(starts.data());
        const auto* s1 = static_cast<const int64_t*>(stops.data());
        py::array_t<int64_t> counts({segs, static_cast<py::ssize_t>(n_labels + 2)});
        int64_t bad = 0;
        {
          py::gil_scoped_release release;
          bad = kernelatlas::label_counts(static_cast<const int16_t*>(labels.data()),
                                          static_cast<const float*>(values.data()), s0, s1, segs, n_labels, nan_is_dead,
                                          counts.mutable_data(), threads);
        }
        if (bad)
          throw py::value_error(std::to_string(bad) + " labels are outside -1.." + std::to_string(n_labels - 1) +
                                ": these are not the outputs of an assign run with " + std::to_string(n_labels) +
                                " clusters");
        return counts;
      },
      py::arg("labels"), py::arg("values"), py::arg("starts"), py::arg("stops"), py::arg("n_labels"),
      py::arg("nan_is_dead"), py::arg("threads") = 0,
      "Per-segment counts of assign outputs: [segments, n_labels + 2] int64; column 0 = label -1, 1 + c = "
      "cluster c, last = dead kernels (value NaN if nan_is_dead, else label -1 with value 0).");
  m.def("set_isa", &kernelatlas::set_isa, py::arg("name"),
        "Force 'scalar', 'avx2' or 'avx512' ('' or 'auto' = best supported); returns the previous setting.");
  m.def("active_isa", [] { return isa_name(active_isa()); });
  m.def("supported_isas", &supported_isas);
  m.def(
      "fma_peak_gflops",
      [](double seconds, int threads) {
        py::gil_scoped_release release;
        return fma_peak_gflops(seconds, threads);
      },
      py::arg("seconds") = 0.5, py::arg("threads") = 0,
      "Measured FP32 FMA throughput of the active ISA (GFLOP/s), for putting kernel speeds against the peak.");
  m.def(
      "_check_parallel_errors",
      [](int64_t rows, int64_t fail_from_tile, int threads) {
        // Test hook for the parallel-for's error path: tiles >= fail_from_tile throw; returns tiles run.
        std::atomic<int64_t> done{0};
        {
          py::gil_scoped_release release;
          for_each_tile(rows, 64, 8, threads, [&](idx_t r0, int, const TileScratch&) {
            if (r0 / 64 >= fail_from_tile) throw std::runtime_error("tile " + std::to_string(r0 / 64) + " failed");
            ++done;
          });
        }
        return done.load();
      },
      py::arg("rows"), py::arg("fail_from_tile"), py::arg("threads") = 0);
  m.def("build_info", [] {
    py::dict info;
    info["version"] = KERNELATLAS_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
    info["isa"] = isa_name(active_isa());
    info["isa_forced"] = forced_isa();
    info["isa_supported"] = supported_isas();
    info["isa_compiled"] = compiled_isas();
    std::string why;
    info["bf16"] = bf16_available(&why);
    info["bf16_note"] = why;
    info["openmp"] = openmp_enabled();
    info["threads"] = default_threads();
    info["cuda_built"] = static_cast<bool>(KERNELATLAS_CUDA_BUILT);
    return info;
  });
  bind_quality(m);
}
