// kernelatlas._cuda: the CUDA backend's private module (python/kernelatlas/gpu.py is its Python face).
// Two kinds of entry points per op:
//   *_ptr   device pointers (cupy arrays, torch CUDA tensors: zero-copy), launched on the caller's stream;
//           asynchronous, like any kernel launch on that stream.
//   *_host  numpy arrays and memmaps: streamed through pinned, double-buffered host memory on two CUDA
//           streams, so that reading chunk i+1 (page cache -> pinned), its host-to-device copy and the kernel
//           of chunk i overlap; results are copied into the caller's (numpy) outputs.  Synchronous.
// Models are built and validated by the CPU engine's own code (cpp/src/model.cpp) and uploaded once.
// The module imports without a driver or a GPU (CI builds it with nvcc and no GPU); device_info() says why
// nothing can run.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <functional>
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

py::dict device_info() {
  py::dict info;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  info["runtime_version"] = runtime;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info["device_count"] = 0;
    info["error"] = std::string(cudaGetErrorString(err));
    cudaGetLastError();  // clear the sticky error so a later call can try again
    return info;
  }
  info["device_count"] = count;
  py::list names;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
      names.append(py::str(prop.name) + py::str(" (sm_") + py::str(std::to_string(prop.major * 10 + prop.minor)) +
                   py::str(")"));
    }
  }
  info["devices"] = names;
  return info;
}

// ---------------------------------------------------------------------------------------------- memory

struct DeviceBuffer {
  void* ptr = nullptr;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) check_cuda(cudaMalloc(&ptr, bytes), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

struct PinnedBuffer {
  void* ptr = nullptr;
  explicit PinnedBuffer(size_t bytes) {
    if (bytes) check_cuda(cudaMallocHost(&ptr, bytes), "cudaMallocHost");
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr) cudaFreeHost(ptr);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s) cudaStreamDestroy(s);
  }
};

cudaStream_t stream_arg(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

DType dtype_arg(const std::string& dtype) {
  if (dtype == "float32") return DType::float32;
  if (dtype == "float16") return DType::float16;
  throw py::type_error("kernels must be float32 or float16, got " + dtype);
}

// One output of a streamed op: where its rows go on the host, and bytes per row.
struct HostOut {
  char* dst;
  size_t row_bytes;
};

// Streams x (host, [rows, d]) through the GPU in chunks of chunk_rows: launch(stream, device input, rows,
// device outputs) runs the op on one chunk.  Two slots (pinned input, device input, device outputs, pinned
// outputs, stream) alternate: while slot i&1 computes chunk i, the host copies chunk i+1 into the other slot's
// pinned buffer and queues its transfers.  Throws on any CUDA error; every buffer is freed on the way out.
void stream_rows(const KernelsIn& in, int64_t chunk_rows, const std::vector<HostOut>& outs,
                 const std::function<void(cudaStream_t, const void*, int64_t, const std::vector<void*>&)>& launch) {
  if (in.rows == 0) return;
  const size_t elem = in.dtype == DType::float32 ? 4 : 2;
  const size_t in_row = elem * static_cast<size_t>(in.d);
  chunk_rows = std::max<int64_t>(1, std::min(chunk_rows, in.rows));
  // output k of a slot lives at pin_out / dev_out + offsets[k], each region 256-byte aligned
  std::vector<size_t> offsets;
  size_t out_bytes = 0;
  for (const auto& o : outs) {
    offsets.push_back(out_bytes);
    out_bytes += (o.row_bytes * static_cast<size_t>(chunk_rows) + 255) / 256 * 256;
  }
  const auto out_offset = [&](size_t k) { return offsets[k]; };
  struct Slot {
    PinnedBuffer pin_in, pin_out;
    DeviceBuffer dev_in, dev_out;
    Stream stream;
    int64_t r0 = -1, rows = 0;  // the chunk in flight (-1: none)
    Slot(size_t in_bytes, size_t out_bytes)
        : pin_in(in_bytes), pin_out(out_bytes), dev_in(in_bytes), dev_out(out_bytes) {}
  };
  Slot slots[2] = {Slot(in_row * chunk_rows, out_bytes), Slot(in_row * chunk_rows, out_bytes)};
  const char* src = static_cast<const char*>(in.data);
  const auto drain = [&](Slot& s) {
    if (s.r0 < 0) return;
    check_cuda(cudaStreamSynchronize(s.stream.s), "streamed op");
    for (size_t k = 0; k < outs.size(); ++k)
      std::memcpy(outs[k].dst + outs[k].row_bytes * s.r0, static_cast<char*>(s.pin_out.ptr) + out_offset(k),
                  outs[k].row_bytes * s.rows);
    s.r0 = -1;
  };
  int64_t chunk = 0;
  for (int64_t r0 = 0; r0 < in.rows; r0 += chunk_rows, ++chunk) {
    Slot& s = slots[chunk & 1];
    drain(s);  // chunk - 2: its buffers are free once its results are out
    const int64_t rows = std::min(chunk_rows, in.rows - r0);
    std::memcpy(s.pin_in.ptr, src + in_row * r0, in_row * rows);  // page cache -> pinned, overlapping the GPU
    check_cuda(cudaMemcpyAsync(s.dev_in.ptr, s.pin_in.ptr, in_row * rows, cudaMemcpyHostToDevice, s.stream.s),
               "host-to-device copy");
    std::vector<void*> dev_outs;
    for (size_t k = 0; k < outs.size(); ++k) dev_outs.push_back(static_cast<char*>(s.dev_out.ptr) + out_offset(k));
    launch(s.stream.s, s.dev_in.ptr, rows, dev_outs);
    for (size_t k = 0; k < outs.size(); ++k)
      check_cuda(cudaMemcpyAsync(static_cast<char*>(s.pin_out.ptr) + out_offset(k), dev_outs[k],
                                 outs[k].row_bytes * rows, cudaMemcpyDeviceToHost, s.stream.s),
                 "device-to-host copy");
    s.r0 = r0;
    s.rows = rows;
  }
  drain(slots[chunk & 1]);
  drain(slots[(chunk + 1) & 1]);
}

// A writable, C-contiguous numpy output of the given dtype and shape (or a new one).
template <class T>
py::array_t<T> host_out(const std::optional<py::array>& out, const std::vector<py::ssize_t>& shape, const char* name) {
  if (!out) return py::array_t<T>(shape);
  const py::array& a = *out;
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must be " + py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                         bindings::dtype_str(a));
  bindings::require_shape(a, shape, name);
  if (!bindings::is_c_contiguous(a)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (!a.writeable())
    throw py::value_error(std::string(name) + " is read-only: open an output memmap with mode 'r+' or 'w+'");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

constexpr int64_t kDefaultChunk = 1 << 20;  // rows per streamed chunk: 196 MB of fp32 7x7 kernels per slot

// ---------------------------------------------------------------------------------------------- models

struct DeviceAutoencoder {
  AutoencoderModel model;
  ModelBlob blob;
  DeviceBuffer dev;
  DeviceAutoencoder(int d, const py::list& enc, const py::list& dec, std::vector<float> lo, std::vector<float> hi)
      : model(d, layers_arg(enc, "encoder"), layers_arg(dec, "decoder"), std::move(lo), std::move(hi)),
        blob(model_blob(model.view())),
        dev(blob.floats.size() * sizeof(float)) {
    check_cuda(cudaMemcpy(dev.ptr, blob.floats.data(), blob.floats.size() * sizeof(float), cudaMemcpyHostToDevice),
               "model upload");
  }
  const float* device_blob() const { return static_cast<const float*>(dev.ptr); }

  EncodeArgs encode_args(const void* x, DType dtype, int64_t rows, float min_abs, float* codes, bool tf32) const {
    EncodeArgs a;
    a.tf32 = tf32;
    a.m = blob.m;
    a.blob = device_blob();
    a.x = x;
    a.dtype = dtype;
    a.rows = rows;
    a.min_abs = min_abs;
    a.codes = codes;
    return a;
  }
  AssignArgs assign_args(const void* x, DType dtype, int64_t rows, float threshold, float min_abs, bool segments,
                         int16_t* labels, float* scores, float* codes, bool tf32, float recheck_code,
                         float recheck_score) const {
    AssignArgs a;
    a.tf32 = tf32;
    a.recheck_code = recheck_code;
    a.recheck_score = recheck_score;
    a.m = blob.m;
    a.blob = device_blob();
    a.use_segments = segments;
    a.x = x;
    a.dtype = dtype;
    a.rows = rows;
    a.threshold = threshold;
    a.min_abs = min_abs;
    a.labels = labels;
    a.scores = scores;
    a.codes = codes;
    return a;
  }
};

struct DevicePrototypes {
  PrototypeSet set;
  PrototypeBlob blob;
  DeviceBuffer dev;
  DevicePrototypes(const py::array& p, int d)
      : set(d, static_cast<int>(p.shape(0)), static_cast<const float*>(p.data())),
        blob(prototype_blob(set)),
        dev(blob.floats.size() * sizeof(float)) {
    check_cuda(cudaMemcpy(dev.ptr, blob.floats.data(), blob.floats.size() * sizeof(float), cudaMemcpyHostToDevice),
               "prototype upload");
  }
  PrototypesArgs args(const void* x, DType dtype, int64_t rows, float threshold, float min_abs, int16_t* labels,
                      float* scores) const {
    PrototypesArgs a;
    a.p = blob.p;
    a.blob = static_cast<const float*>(dev.ptr);
    a.x = x;
    a.dtype = dtype;
    a.rows = rows;
    a.threshold = threshold;
    a.min_abs = min_abs;
    a.labels = labels;
    a.scores = scores;
    return a;
  }
};

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kernelatlas CUDA backend (private; use device='cuda' in the kernelatlas API).";
  m.def("device_info", &device_info, "Runtime version and visible CUDA devices; never raises for a missing driver.");
  m.def(
      "synchronize",
      [](uintptr_t stream) {
        py::gil_scoped_release release;
        check_cuda(cudaStreamSynchronize(stream_arg(stream)), "cudaStreamSynchronize");
      },
      py::arg("stream") = 0);

  // ---- normalize
  m.def(
      "normalize_ptr",
      [](uintptr_t x, const std::string& dtype, int64_t rows, int d, double min_abs, uintptr_t out, uintptr_t norms,
         uintptr_t stream) {
        NormalizeArgs a;
        a.x = ptr<const void>(x);
        a.dtype = dtype_arg(dtype);
        a.rows = rows;
        a.d = d;
        a.min_abs = min_abs_arg(min_abs);
        a.normalized = ptr<float>(out);
        a.norms = ptr<float>(norms);
        launch_normalize(a, stream_arg(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("d"), py::arg("min_abs"), py::arg("out"),
      py::arg("norms"), py::arg("stream"));
  m.def(
      "normalize_host",
      [](const py::array& x, std::optional<py::array> out, std::optional<py::array> norms, double min_abs,
         int64_t chunk_rows) {
        const KernelsIn in = bindings::kernels_arg(x, -1, "x");
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        auto out_a = host_out<float>(out, shape, "out");
        auto norms_a = host_out<float>(norms, {static_cast<py::ssize_t>(in.rows)}, "norms");
        const float ma = min_abs_arg(min_abs);
        const std::vector<HostOut> outs{{reinterpret_cast<char*>(out_a.mutable_data()), sizeof(float) * in.d},
                                        {reinterpret_cast<char*>(norms_a.mutable_data()), sizeof(float)}};
        {
          py::gil_scoped_release release;
          stream_rows(in, chunk_rows, outs,
                      [&](cudaStream_t s, const void* dx, int64_t rows, const std::vector<void*>& o) {
                        NormalizeArgs a;
                        a.x = dx;
                        a.dtype = in.dtype;
                        a.rows = rows;
                        a.d = in.d;
                        a.min_abs = ma;
                        a.normalized = static_cast<float*>(o[0]);
                        a.norms = static_cast<float*>(o[1]);
                        launch_normalize(a, s);
                      });
        }
        return py::make_tuple(out_a, norms_a);
      },
      py::arg("x"), py::kw_only(), py::arg("out") = py::none(), py::arg("norms") = py::none(), py::arg("min_abs") = 0.0,
      py::arg("chunk_rows") = kDefaultChunk);

  // ---- autoencoder: encode, assign
  py::class_<DeviceAutoencoder>(m, "DeviceAutoencoder")
      .def(py::init<int, const py::list&, const py::list&, std::vector<float>, std::vector<float>>(), py::arg("d"),
           py::arg("encoder"), py::arg("decoder"), py::arg("intervals_lo") = std::vector<float>{},
           py::arg("intervals_hi") = std::vector<float>{})
      .def_property_readonly("d", [](const DeviceAutoencoder& s) { return s.model.d(); })
      .def_property_readonly("n_segments", [](const DeviceAutoencoder& s) { return s.blob.m.n_seg; })
      .def(
          "encode_ptr",
          [](const DeviceAutoencoder& self, uintptr_t x, const std::string& dtype, int64_t rows, double min_abs,
             uintptr_t codes, uintptr_t stream, const std::string& precision) {
            launch_encode(self.encode_args(ptr<const void>(x), dtype_arg(dtype), rows, min_abs_arg(min_abs),
                                           ptr<float>(codes), tf32_arg(precision)),
                          stream_arg(stream));
          },
          py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("min_abs"), py::arg("codes"), py::arg("stream"),
          py::arg("precision") = "fp32")
      .def(
          "assign_ptr",
          [](const DeviceAutoencoder& self, uintptr_t x, const std::string& dtype, int64_t rows, double threshold,
             double min_abs, const std::string& decoder, uintptr_t labels, uintptr_t scores, uintptr_t codes,
             uintptr_t stream, const std::string& precision, double recheck_code, double recheck_score) {
            launch_assign(
                self.assign_args(ptr<const void>(x), dtype_arg(dtype), rows, threshold_arg(threshold),
                                 min_abs_arg(min_abs), use_segments_arg(self.model, decoder), ptr<int16_t>(labels),
                                 ptr<float>(scores), ptr<float>(codes), tf32_arg(precision),
                                 margin_arg(recheck_code, "recheck_code"), margin_arg(recheck_score, "recheck_score")),
                stream_arg(stream));
          },
          py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("threshold"), py::arg("min_abs"), py::arg("decoder"),
          py::arg("labels"), py::arg("scores"), py::arg("codes"), py::arg("stream"), py::arg("precision") = "fp32",
          py::arg("recheck_code") = 0.0, py::arg("recheck_score") = 0.0)
      .def(
          "encode_host",
          [](const DeviceAutoencoder& self, const py::array& x, std::optional<py::array> out, double min_abs,
             int64_t chunk_rows, const std::string& precision) {
            const KernelsIn in = bindings::kernels_arg(x, self.model.d(), "x");
            auto codes = host_out<float>(out, {static_cast<py::ssize_t>(in.rows)}, "out");
            const float ma = min_abs_arg(min_abs);
            const bool tf32 = tf32_arg(precision);
            const std::vector<HostOut> outs{{reinterpret_cast<char*>(codes.mutable_data()), sizeof(float)}};
            {
              py::gil_scoped_release release;
              stream_rows(in, chunk_rows, outs,
                          [&](cudaStream_t s, const void* dx, int64_t rows, const std::vector<void*>& o) {
                            launch_encode(self.encode_args(dx, in.dtype, rows, ma, static_cast<float*>(o[0]), tf32), s);
                          });
            }
            return codes;
          },
          py::arg("x"), py::kw_only(), py::arg("out") = py::none(), py::arg("min_abs") = 0.0,
          py::arg("chunk_rows") = kDefaultChunk, py::arg("precision") = "fp32")
      .def(
          "assign_host",
          [](const DeviceAutoencoder& self, const py::array& x, double threshold, std::optional<py::array> labels,
             std::optional<py::array> scores, std::optional<py::array> codes, double min_abs,
             const std::string& decoder, int64_t chunk_rows, const std::string& precision, double recheck_code,
             double recheck_score) {
            const KernelsIn in = bindings::kernels_arg(x, self.model.d(), "x");
            const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(in.rows)};
            auto lab = host_out<int16_t>(labels, shape, "labels");
            auto sc = host_out<float>(scores, shape, "scores");
            auto cd = host_out<float>(codes, shape, "codes");
            const float thr = threshold_arg(threshold), ma = min_abs_arg(min_abs);
            const bool seg = use_segments_arg(self.model, decoder);
            const bool tf32 = tf32_arg(precision);
            const float rc = margin_arg(recheck_code, "recheck_code"), rs = margin_arg(recheck_score, "recheck_score");
            const std::vector<HostOut> outs{{reinterpret_cast<char*>(lab.mutable_data()), sizeof(int16_t)},
                                            {reinterpret_cast<char*>(sc.mutable_data()), sizeof(float)},
                                            {reinterpret_cast<char*>(cd.mutable_data()), sizeof(float)}};
            {
              py::gil_scoped_release release;
              stream_rows(
                  in, chunk_rows, outs, [&](cudaStream_t s, const void* dx, int64_t rows, const std::vector<void*>& o) {
                    launch_assign(self.assign_args(dx, in.dtype, rows, thr, ma, seg, static_cast<int16_t*>(o[0]),
                                                   static_cast<float*>(o[1]), static_cast<float*>(o[2]), tf32, rc, rs),
                                  s);
                  });
            }
            return py::make_tuple(lab, sc, cd);
          },
          py::arg("x"), py::kw_only(), py::arg("threshold") = 0.85, py::arg("labels") = py::none(),
          py::arg("scores") = py::none(), py::arg("codes") = py::none(), py::arg("min_abs") = 0.0,
          py::arg("decoder") = "auto", py::arg("chunk_rows") = kDefaultChunk, py::arg("precision") = "fp32",
          py::arg("recheck_code") = 0.0, py::arg("recheck_score") = 0.0);

  // ---- prototypes
  py::class_<DevicePrototypes>(m, "DevicePrototypes")
      .def(py::init([](const py::array& p) {
             if (p.ndim() != 2 || !p.dtype().is(py::dtype::of<float>()) || !bindings::is_c_contiguous(p))
               throw py::value_error("prototypes must be a C-contiguous float32 array [n_prototypes, k*k], got " +
                                     bindings::dtype_str(p) + " " + bindings::shape_str(p));
             if (p.shape(0) > kMaxPrototypes)
               throw py::value_error("need 1.." + std::to_string(kMaxPrototypes) + " prototypes, got " +
                                     std::to_string(p.shape(0)));
             return new DevicePrototypes(p, bindings::int_extent(p.shape(1), kMaxDim, "the prototype size"));
           }),
           py::arg("prototypes"))
      .def_property_readonly("d", [](const DevicePrototypes& s) { return s.blob.p.d; })
      .def(
          "assign_ptr",
          [](const DevicePrototypes& self, uintptr_t x, const std::string& dtype, int64_t rows, double threshold,
             double min_abs, uintptr_t labels, uintptr_t scores, uintptr_t stream) {
            launch_assign_prototypes(self.args(ptr<const void>(x), dtype_arg(dtype), rows, threshold_arg(threshold),
                                               min_abs_arg(min_abs), ptr<int16_t>(labels), ptr<float>(scores)),
                                     stream_arg(stream));
          },
          py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("threshold"), py::arg("min_abs"), py::arg("labels"),
          py::arg("scores"), py::arg("stream"))
      .def(
          "assign_host",
          [](const DevicePrototypes& self, const py::array& x, double threshold, std::optional<py::array> labels,
             std::optional<py::array> scores, double min_abs, int64_t chunk_rows) {
            const KernelsIn in = bindings::kernels_arg(x, self.blob.p.d, "x");
            const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(in.rows)};
            auto lab = host_out<int16_t>(labels, shape, "labels");
            auto sc = host_out<float>(scores, shape, "scores");
            const float thr = threshold_arg(threshold), ma = min_abs_arg(min_abs);
            const std::vector<HostOut> outs{{reinterpret_cast<char*>(lab.mutable_data()), sizeof(int16_t)},
                                            {reinterpret_cast<char*>(sc.mutable_data()), sizeof(float)}};
            {
              py::gil_scoped_release release;
              stream_rows(
                  in, chunk_rows, outs, [&](cudaStream_t s, const void* dx, int64_t rows, const std::vector<void*>& o) {
                    launch_assign_prototypes(
                        self.args(dx, in.dtype, rows, thr, ma, static_cast<int16_t*>(o[0]), static_cast<float*>(o[1])),
                        s);
                  });
            }
            return py::make_tuple(lab, sc);
          },
          py::arg("x"), py::kw_only(), py::arg("threshold"), py::arg("labels") = py::none(),
          py::arg("scores") = py::none(), py::arg("min_abs") = 0.0, py::arg("chunk_rows") = kDefaultChunk);
}
