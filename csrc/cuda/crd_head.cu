// Host launchers of the fused CRD head and residual kernels (device code: crd_head_kernels.cuh, shared with CuPy).
// Twin of csrc/cpu/crd_head.pyx. Python (crd_fast/ops/cuda_launch.py) checks every pointer's device, dtype,
// shape and contiguity and allocates partial (tiles x N) and out (N) before calling here.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "common.h"
#include "cuda/crd_head_kernels.cuh"

namespace crd_fast {
namespace cuda {
static_assert(kHeadMaxLayers == crd_head::kMaxLayers, "common.h kHeadMaxLayers must match the kernels");
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("crd_fast CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// One tile launch; dst is a.partial (crd_head_tile_*) or a.out (crd_residual_tile_*, no finish kernel).
template <typename T, typename W, typename Acc, typename Kernel>
void launch_tile(Kernel kernel, const HeadArgs& a, std::uintptr_t dst, cudaStream_t stream, const char* what) {
  const std::int64_t n = static_cast<std::int64_t>(a.batch) * a.h0 * a.w0;
  const T* f[crd_head::kMaxLayers];
  for (int l = 0; l < crd_head::kMaxLayers; ++l) {
    // unused slots repeat layer 0: never read (num_layers bounds every access)
    f[l] = reinterpret_cast<const T*>(a.maps[l < a.num_layers ? l : 0]);
  }
  const dim3 grid(static_cast<unsigned>((n + crd_head::kTileP - 1) / crd_head::kTileP),
                  static_cast<unsigned>((a.r + crd_head::kTileR - 1) / crd_head::kTileR));
  kernel<<<grid, crd_head::kThreads, 0, stream>>>(
      f[0], f[1], f[2], f[3], a.num_layers, reinterpret_cast<const int*>(a.plan),
      reinterpret_cast<const W*>(a.weights), reinterpret_cast<const T*>(a.matrix),
      reinterpret_cast<const Acc*>(a.q), reinterpret_cast<Acc*>(dst), a.batch, a.h0, a.w0, a.c_total, a.r);
  check(cudaGetLastError(), what);
}

template <typename Acc, typename Kernel>
void launch_finish(Kernel kernel, const HeadArgs& a, cudaStream_t stream) {
  const long long n = static_cast<long long>(a.batch) * a.h0 * a.w0;
  const int tiles = (a.r + crd_head::kTileR - 1) / crd_head::kTileR;
  const dim3 grid(static_cast<unsigned>((n + crd_head::kFinishThreads - 1) / crd_head::kFinishThreads));
  kernel<<<grid, crd_head::kFinishThreads, 0, stream>>>(reinterpret_cast<const Acc*>(a.partial), reinterpret_cast<Acc*>(a.out), n, tiles);
  check(cudaGetLastError(), "crd_head finish launch");
}

}  // namespace

void crd_head(DType dtype, const HeadArgs& a, std::uintptr_t stream_handle) {
  if (a.num_layers < 1 || a.num_layers > crd_head::kMaxLayers) {
    throw std::invalid_argument("crd_head_cuda: num_layers must be 1.." + std::to_string(crd_head::kMaxLayers));
  }
  if (a.batch <= 0 || a.h0 <= 0 || a.w0 <= 0 || a.r <= 0) return;  // nothing to score
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::Float32:
      launch_tile<float, float, float>(crd_head_tile_f32, a, a.partial, stream, "crd_head tile launch");
      launch_finish<float>(crd_head_finish_f32, a, stream);
      break;
    case DType::Float64:
      launch_tile<double, double, double>(crd_head_tile_f64, a, a.partial, stream, "crd_head tile launch");
      launch_finish<double>(crd_head_finish_f64, a, stream);
      break;
    case DType::Float16:
      launch_tile<__half, float, float>(crd_head_tile_f16, a, a.partial, stream, "crd_head tile launch");
      launch_finish<float>(crd_head_finish_f32, a, stream);
      break;
    case DType::BFloat16:
      launch_tile<__nv_bfloat16, float, float>(crd_head_tile_bf16, a, a.partial, stream, "crd_head tile launch");
      launch_finish<float>(crd_head_finish_f32, a, stream);
      break;
  }
}

void crd_residual(DType dtype, const HeadArgs& a, std::uintptr_t stream_handle) {
  if (a.num_layers < 1 || a.num_layers > crd_head::kMaxLayers) {
    throw std::invalid_argument("crd_residual_cuda: num_layers must be 1.." + std::to_string(crd_head::kMaxLayers));
  }
  if (a.batch <= 0 || a.h0 <= 0 || a.w0 <= 0 || a.r <= 0) return;  // an empty (N, r) output
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const char* what = "crd_residual tile launch";
  switch (dtype) {
    case DType::Float32:
      launch_tile<float, float, float>(crd_residual_tile_f32, a, a.out, stream, what);
      break;
    case DType::Float64:
      launch_tile<double, double, double>(crd_residual_tile_f64, a, a.out, stream, what);
      break;
    case DType::Float16:
      launch_tile<__half, float, float>(crd_residual_tile_f16, a, a.out, stream, what);
      break;
    case DType::BFloat16:
      launch_tile<__nv_bfloat16, float, float>(crd_residual_tile_bf16, a, a.out, stream, what);
      break;
  }
}

std::vector<KernelAttributes> crd_head_attributes() {
  struct Entry {
    const char* name;
    const void* fn;
  };
  const Entry entries[] = {
      {"crd_head_tile_f32", reinterpret_cast<const void*>(crd_head_tile_f32)},
      {"crd_head_tile_f64", reinterpret_cast<const void*>(crd_head_tile_f64)},
      {"crd_head_tile_f16", reinterpret_cast<const void*>(crd_head_tile_f16)},
      {"crd_head_tile_bf16", reinterpret_cast<const void*>(crd_head_tile_bf16)},
      {"crd_residual_tile_f32", reinterpret_cast<const void*>(crd_residual_tile_f32)},
      {"crd_residual_tile_f64", reinterpret_cast<const void*>(crd_residual_tile_f64)},
      {"crd_residual_tile_f16", reinterpret_cast<const void*>(crd_residual_tile_f16)},
      {"crd_residual_tile_bf16", reinterpret_cast<const void*>(crd_residual_tile_bf16)},
      {"crd_head_finish_f32", reinterpret_cast<const void*>(crd_head_finish_f32)},
      {"crd_head_finish_f64", reinterpret_cast<const void*>(crd_head_finish_f64)},
  };
  std::vector<KernelAttributes> out;
  for (const Entry& e : entries) {
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, e.fn), e.name);
    out.push_back({e.name, attr.numRegs, static_cast<long long>(attr.localSizeBytes),
                   static_cast<long long>(attr.sharedSizeBytes), attr.binaryVersion});
  }
  return out;
}

}  // namespace cuda
}  // namespace crd_fast
