// pybind11 bindings of crd_fast._C. Every function takes pointers as integers; see crd_fast/_native.py
// for the checked Python wrappers that are the only callers.
#include <pybind11/pybind11.h>

#include "common.h"

#ifdef CRD_FAST_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace crd_fast;

PYBIND11_MODULE(_C, m) {
  m.doc() = "crd_fast native kernels (pointer-based, torch-free)";

  m.def(
      "build_info",
      []() {
        py::dict info;
#ifdef CRD_FAST_WITH_CUDA
        info["cuda"] = true;
        info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
        info["cuda"] = false;
        info["cuda_version"] = py::none();
#endif
#ifdef CRD_FAST_WITH_OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "What this build of the native module contains.");

  m.def(
      "residual_norm_cpu",
      [](const std::string& dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out, std::int64_t rows,
         std::int64_t cols) {
        const DType dt = dtype_from_name(dtype);
        py::gil_scoped_release release;
        cpu::residual_norm(dt, z, q, out, rows, cols);
      },
      py::arg("dtype"), py::arg("z"), py::arg("q"), py::arg("out"), py::arg("rows"), py::arg("cols"),
      "out[i] = ||z[i] - q|| for row-major z (rows x cols); q = 0 means no offset.");

#ifdef CRD_FAST_WITH_CUDA
  m.def(
      "residual_norm_cuda",
      [](const std::string& dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out, std::int64_t rows,
         std::int64_t cols, std::uintptr_t stream) {
        const DType dt = dtype_from_name(dtype);
        py::gil_scoped_release release;
        cuda::residual_norm(dt, z, q, out, rows, cols, stream);
      },
      py::arg("dtype"), py::arg("z"), py::arg("q"), py::arg("out"), py::arg("rows"), py::arg("cols"),
      py::arg("stream"), "CUDA twin of residual_norm_cpu, launched on the given stream.");
#endif
}
