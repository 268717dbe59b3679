// kernelatlas._cuda: the CUDA backend's private module.  It exists in every build where CMake found nvcc so
// that the build path is tested in CI (which has nvcc but no GPU).  It holds no kernels yet; it answers
// which devices the runtime sees, without failing when there is no driver or no GPU.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

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

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kernelatlas CUDA backend (private). Kernels arrive with the CUDA issue.";
  m.def("device_info", &device_info, "Runtime version and visible CUDA devices; never raises for a missing driver.");
}
