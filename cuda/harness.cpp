// kernelatlas._cuda_harness: the CUDA kernels' bodies (cuda/ops/*.cuh) compiled by the host compiler and run on
// the CPU, block by block, phase by phase, every thread of a block between two barriers -- the semantics of a
// launch, without a GPU.  tests/test_cuda_harness.py compares it with the CPU engine, so the GPU kernels' logic
// (tiling, tails, shared-memory layout and staging, launch plans, the math) is tested on every machine; the
// real device runs in tests/gpu/ check the rest.  A test extension, not an API: built in every build, never
// imported by the package.
//
// Shared memory is filled with NaN before each block, so a read of a location no earlier phase wrote shows up;
// the threads of a phase run in the order asked for (forward, reverse, odd-then-even), so a phase whose
// result depends on another thread's writes within the same phase (a missing barrier) shows up as a
// difference between orders.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "bind_model.h"
#include "bindings_args.h"
#include "model_blob.h"
#include "ops/assign.cuh"
#include "ops/assign_prototypes.cuh"
#include "ops/encode.cuh"
#include "ops/normalize.cuh"

namespace py = pybind11;
using namespace kernelatlas;
using namespace kernelatlas::gpu;

namespace {

std::vector<int> thread_order(int threads, const std::string& order) {
  std::vector<int> perm;
  if (order == "forward") {
    for (int t = 0; t < threads; ++t) perm.push_back(t);
  } else if (order == "reverse") {
    for (int t = threads - 1; t >= 0; --t) perm.push_back(t);
  } else if (order == "interleaved") {
    for (int t = 1; t < threads; t += 2) perm.push_back(t);
    for (int t = 0; t < threads; t += 2) perm.push_back(t);
  } else {
    throw py::value_error("order must be 'forward', 'reverse' or 'interleaved', got '" + order + "'");
  }
  return perm;
}

// Runs a launch of Op on the host: grid = ceil(rows / threads) blocks of `threads`, smem_floats of shared memory.
template <class Op>
void run_launch(const typename Op::Args& a, int64_t rows, int threads, int64_t smem_floats, const std::string& order) {
  const std::vector<int> perm = thread_order(threads, order);
  if (rows == 0) return;  // no launch on empty input, as on the device
  const int64_t grid = (rows + threads - 1) / threads;
  std::vector<float> smem(static_cast<size_t>(smem_floats) + 1);
  py::gil_scoped_release release;
  for (int64_t blk = 0; blk < grid; ++blk) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
    for (int p = 0; p < Op::kPhases; ++p)
      for (int t : perm) Op::phase(p, a, BlockCtx{blk, t, threads, smem.data()});
  }
}

LaunchPlan plan_or_refuse(int row_floats, int blob_floats, int64_t budget) {
  const LaunchPlan plan = plan_launch(row_floats, blob_floats, budget);
  if (plan.threads == 0)
    throw py::value_error("the shared-memory budget of " + std::to_string(budget) +
                          " bytes cannot hold 32 rows of this model's activations");
  return plan;
}

py::dict plan_dict(const LaunchPlan& p) {
  py::dict d;
  d["threads"] = p.threads;
  d["stage_floats"] = p.stage_floats;
  d["smem_bytes"] = p.smem_bytes;
  return d;
}

constexpr int64_t kDefaultBudget = 227 * 1024;  // opt-in shared memory per block of sm_90 (and sm_80: 163 KB)

struct HarnessAutoencoder {
  AutoencoderModel model;
  ModelBlob blob;
  HarnessAutoencoder(int d, const py::list& enc, const py::list& dec, std::vector<float> lo, std::vector<float> hi)
      : model(d, layers_arg(enc, "encoder"), layers_arg(dec, "decoder"), std::move(lo), std::move(hi)),
        blob(model_blob(model.view())) {}
};

struct HarnessPrototypes {
  PrototypeSet set;
  PrototypeBlob blob;
  HarnessPrototypes(const py::array& p, int d)
      : set(d, static_cast<int>(p.shape(0)), static_cast<const float*>(p.data())), blob(prototype_blob(set)) {}
};

}  // namespace

PYBIND11_MODULE(_cuda_harness, m) {
  m.doc() = "The CUDA kernels' bodies run on the CPU, launch by launch (a test extension; not an API).";

  m.def(
      "normalize",
      [](const py::array& x, double min_abs, int threads, const std::string& order) {
        const KernelsIn in = bindings::kernels_arg(x, -1, "x");
        if (threads != 32 && threads != 64 && threads != 128) throw py::value_error("threads must be 32, 64 or 128");
        py::array_t<float> out({static_cast<py::ssize_t>(in.rows), static_cast<py::ssize_t>(in.d)});
        py::array_t<float> norms(static_cast<py::ssize_t>(in.rows));
        NormalizeArgs a;
        a.x = in.data;
        a.dtype = in.dtype;
        a.rows = in.rows;
        a.d = in.d;
        a.min_abs = min_abs_arg(min_abs);
        a.normalized = out.mutable_data();
        a.norms = norms.mutable_data();
        run_launch<NormalizeOp>(a, in.rows, threads, static_cast<int64_t>(in.d) * row_stride(threads), order);
        return py::make_tuple(out, norms);
      },
      py::arg("x"), py::kw_only(), py::arg("min_abs") = 0.0, py::arg("threads") = kMaxThreads,
      py::arg("order") = "forward");

  m.def(
      "plan",
      [](int row_floats, int blob_floats, int64_t budget) {
        return plan_dict(plan_launch(row_floats, blob_floats, budget));
      },
      py::arg("row_floats"), py::arg("blob_floats"), py::arg("budget"));

  py::class_<HarnessAutoencoder>(m, "Autoencoder")
      .def(py::init<int, const py::list&, const py::list&, std::vector<float>, std::vector<float>>(), py::arg("d"),
           py::arg("encoder"), py::arg("decoder"), py::arg("intervals_lo") = std::vector<float>{},
           py::arg("intervals_hi") = std::vector<float>{})
      .def_property_readonly("n_segments", [](const HarnessAutoencoder& s) { return s.blob.m.n_seg; })
      .def_property_readonly("blob_floats", [](const HarnessAutoencoder& s) { return s.blob.m.floats_all; })
      .def_property_readonly("tf32_applies", [](const HarnessAutoencoder& s) { return tf32_applies(s.blob.m); })
      .def(
          "encode",
          [](const HarnessAutoencoder& self, const py::array& x, double min_abs, int64_t budget,
             const std::string& order, const std::string& precision) {
            const KernelsIn in = bindings::kernels_arg(x, self.model.d(), "x");
            py::array_t<float> codes(static_cast<py::ssize_t>(in.rows));
            EncodeArgs a;
            a.m = self.blob.m;
            a.blob = self.blob.floats.data();
            a.tf32 = tf32_arg(precision) && tf32_applies(a.m);  // as launch_encode decides
            const LaunchPlan plan = plan_or_refuse(ae_row_floats(a.m, false, a.tf32), a.m.floats_enc, budget);
            a.stage_floats = plan.stage_floats;
            a.x = in.data;
            a.dtype = in.dtype;
            a.rows = in.rows;
            a.min_abs = min_abs_arg(min_abs);
            a.codes = codes.mutable_data();
            const int64_t smem = ae_layout(a.m, a.stage_floats, false, plan.threads, a.tf32).total;
            if (a.tf32)
              run_launch<EncodeOpT<true>>(a, in.rows, plan.threads, smem, order);
            else
              run_launch<EncodeOp>(a, in.rows, plan.threads, smem, order);
            return py::make_tuple(codes, plan_dict(plan));
          },
          py::arg("x"), py::kw_only(), py::arg("min_abs") = 0.0, py::arg("budget") = kDefaultBudget,
          py::arg("order") = "forward", py::arg("precision") = "fp32")
      .def(
          "assign",
          [](const HarnessAutoencoder& self, const py::array& x, double threshold, double min_abs,
             const std::string& decoder, int64_t budget, const std::string& order, const std::string& precision,
             double recheck_code, double recheck_score) {
            const KernelsIn in = bindings::kernels_arg(x, self.model.d(), "x");
            const py::ssize_t n = static_cast<py::ssize_t>(in.rows);
            py::array_t<int16_t> labels(n);
            py::array_t<float> scores(n), codes(n);
            AssignArgs a;
            a.m = self.blob.m;
            a.blob = self.blob.floats.data();
            a.use_segments = use_segments_arg(self.model, decoder);
            const bool mlp = !a.use_segments;
            a.tf32 = tf32_arg(precision) && tf32_applies(a.m);  // as launch_assign decides
            a.recheck_code = margin_arg(recheck_code, "recheck_code");
            a.recheck_score = margin_arg(recheck_score, "recheck_score");
            const LaunchPlan plan =
                plan_or_refuse(ae_row_floats(a.m, mlp, a.tf32), mlp ? a.m.floats_all : a.m.floats_table, budget);
            a.stage_floats = plan.stage_floats;
            a.x = in.data;
            a.dtype = in.dtype;
            a.rows = in.rows;
            a.threshold = threshold_arg(threshold);
            a.min_abs = min_abs_arg(min_abs);
            a.labels = labels.mutable_data();
            a.scores = scores.mutable_data();
            a.codes = codes.mutable_data();
            const int64_t smem = ae_layout(a.m, a.stage_floats, mlp, plan.threads, a.tf32).total;
            if (a.tf32)
              run_launch<AssignOpT<true>>(a, in.rows, plan.threads, smem, order);
            else
              run_launch<AssignOp>(a, in.rows, plan.threads, smem, order);
            return py::make_tuple(labels, scores, codes, plan_dict(plan));
          },
          py::arg("x"), py::kw_only(), py::arg("threshold") = 0.85, py::arg("min_abs") = 0.0,
          py::arg("decoder") = "auto", py::arg("budget") = kDefaultBudget, py::arg("order") = "forward",
          py::arg("precision") = "fp32", py::arg("recheck_code") = 0.0, py::arg("recheck_score") = 0.0);

  py::class_<HarnessPrototypes>(m, "Prototypes")
      .def(py::init([](const py::array& p) {
             if (p.ndim() != 2 || !p.dtype().is(py::dtype::of<float>()) || !bindings::is_c_contiguous(p))
               throw py::value_error("prototypes must be a C-contiguous float32 array [n_prototypes, k*k]");
             if (p.shape(0) > kMaxPrototypes) throw py::value_error("too many prototypes");
             return new HarnessPrototypes(p, bindings::int_extent(p.shape(1), kMaxDim, "the prototype size"));
           }),
           py::arg("prototypes"))
      .def(
          "assign",
          [](const HarnessPrototypes& self, const py::array& x, double threshold, double min_abs, int64_t budget,
             const std::string& order) {
            const KernelsIn in = bindings::kernels_arg(x, self.blob.p.d, "x");
            const py::ssize_t n = static_cast<py::ssize_t>(in.rows);
            py::array_t<int16_t> labels(n);
            py::array_t<float> scores(n);
            PrototypesArgs a;
            a.p = self.blob.p;
            a.blob = self.blob.floats.data();
            const LaunchPlan plan = plan_or_refuse(a.p.d, a.p.floats_all, budget);
            a.stage_floats = plan.stage_floats;
            a.x = in.data;
            a.dtype = in.dtype;
            a.rows = in.rows;
            a.threshold = threshold_arg(threshold);
            a.min_abs = min_abs_arg(min_abs);
            a.labels = labels.mutable_data();
            a.scores = scores.mutable_data();
            run_launch<PrototypesOp>(
                a, in.rows, plan.threads,
                PrototypesOp::xt_offset(a.stage_floats) + static_cast<int64_t>(a.p.d) * row_stride(plan.threads),
                order);
            return py::make_tuple(labels, scores, plan_dict(plan));
          },
          py::arg("x"), py::kw_only(), py::arg("threshold"), py::arg("min_abs") = 0.0,
          py::arg("budget") = kDefaultBudget, py::arg("order") = "forward");
}
