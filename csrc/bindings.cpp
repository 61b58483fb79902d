// pybind11 bindings of crd_fast.ops._C. Every function takes pointers as integers; see crd_fast/ops/native.py
// for the checked Python wrappers that are the only callers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"

#ifdef CRD_FAST_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace crd_fast;

#ifdef CRD_FAST_WITH_CUDA
// The kernels' arguments from the bindings' flat ones (1 to kHeadMaxLayers maps; unused slots repeat layer 0 and
// are never read). ``name`` names the entry point in the error.
static HeadArgs head_args(const char* name, const std::vector<std::uintptr_t>& maps, std::uintptr_t plan,
                          std::uintptr_t weights, std::uintptr_t matrix, std::uintptr_t q, std::uintptr_t partial,
                          std::uintptr_t out, int batch, int h0, int w0, int c_total, int r) {
  if (maps.empty() || maps.size() > static_cast<std::size_t>(kHeadMaxLayers)) {
    throw std::invalid_argument(std::string(name) + ": 1 to " + std::to_string(kHeadMaxLayers) +
                                " feature maps, got " + std::to_string(maps.size()));
  }
  HeadArgs a{};
  for (std::size_t l = 0; l < static_cast<std::size_t>(kHeadMaxLayers); ++l) a.maps[l] = maps[l < maps.size() ? l : 0];
  a.num_layers = static_cast<int>(maps.size());
  a.plan = plan;
  a.weights = weights;
  a.matrix = matrix;
  a.q = q;
  a.partial = partial;
  a.out = out;
  a.batch = batch;
  a.h0 = h0;
  a.w0 = w0;
  a.c_total = c_total;
  a.r = r;
  return a;
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "crd_fast native kernels (pointer-based, torch-free)";

  m.def(
      "build_info",
      []() {
        py::dict info;
#ifdef CRD_FAST_WITH_CUDA
        info["cuda"] = true;
        info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef CRD_FAST_CUDA_ARCHS
        info["cuda_archs"] = std::string(CRD_FAST_CUDA_ARCHS);  // CMAKE_CUDA_ARCHITECTURES, comma-separated
#else
        info["cuda_archs"] = py::none();
#endif
#else
        info["cuda"] = false;
        info["cuda_version"] = py::none();
        info["cuda_archs"] = py::none();
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
        const DType dt = real_dtype_from_name(dtype);
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
        const DType dt = real_dtype_from_name(dtype);
        py::gil_scoped_release release;
        cuda::residual_norm(dt, z, q, out, rows, cols, stream);
      },
      py::arg("dtype"), py::arg("z"), py::arg("q"), py::arg("out"), py::arg("rows"), py::arg("cols"),
      py::arg("stream"), "CUDA twin of residual_norm_cpu, launched on the given stream.");

  m.def(
      "crd_head_cuda",
      [](const std::string& dtype, const std::vector<std::uintptr_t>& maps, std::uintptr_t plan,
         std::uintptr_t weights, std::uintptr_t matrix, std::uintptr_t q, std::uintptr_t partial, std::uintptr_t out,
         int batch, int h0, int w0, int c_total, int r, std::uintptr_t stream) {
        const DType dt = dtype_from_name(dtype);
        const HeadArgs a =
            head_args("crd_head_cuda", maps, plan, weights, matrix, q, partial, out, batch, h0, w0, c_total, r);
        py::gil_scoped_release release;
        cuda::crd_head(dt, a, stream);
      },
      py::arg("dtype"), py::arg("maps"), py::arg("plan"), py::arg("weights"), py::arg("matrix"), py::arg("q"),
      py::arg("partial"), py::arg("out"), py::arg("batch"), py::arg("h0"), py::arg("w0"), py::arg("c_total"),
      py::arg("r"), py::arg("stream"),
      "Fused CRD head on CUDA (see csrc/cuda/crd_head_kernels.cuh): out[p] = ||P' e_p - q||.");

  m.def(
      "crd_residual_cuda",
      [](const std::string& dtype, const std::vector<std::uintptr_t>& maps, std::uintptr_t plan,
         std::uintptr_t weights, std::uintptr_t matrix, std::uintptr_t q, std::uintptr_t out,
         int batch, int h0, int w0, int c_total, int r, std::uintptr_t stream) {
        const DType dt = dtype_from_name(dtype);
        // no scratch (partial 0): the residual tile kernel writes out directly
        const HeadArgs a =
            head_args("crd_residual_cuda", maps, plan, weights, matrix, q, 0, out, batch, h0, w0, c_total, r);
        py::gil_scoped_release release;
        cuda::crd_residual(dt, a, stream);
      },
      py::arg("dtype"), py::arg("maps"), py::arg("plan"), py::arg("weights"), py::arg("matrix"), py::arg("q"),
      py::arg("out"), py::arg("batch"), py::arg("h0"), py::arg("w0"), py::arg("c_total"), py::arg("r"),
      py::arg("stream"),
      "Residual mode of the fused head on CUDA: out[p, :] = P' e_p - q[p mod (h0 w0), :], out (N, r).");

  m.def(
      "crd_head_cuda_attributes",
      []() {
        py::list result;
        for (const auto& k : cuda::crd_head_attributes()) {
          py::dict d;
          d["name"] = k.name;
          d["num_regs"] = k.num_regs;
          d["local_bytes"] = k.local_bytes;
          d["shared_bytes"] = k.shared_bytes;
          d["binary_version"] = k.binary_version;
          result.append(d);
        }
        return result;
      },
      "Registers, local-memory (spill) bytes and static shared bytes of the head and residual kernels here.");
#endif
}
