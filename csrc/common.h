// Shared declarations of the crd_fast compiled module. Functions take raw pointers (as integers),
// shapes and, for CUDA, a stream handle, so the module never links libtorch. Python validates
// devices, dtypes, shapes and contiguity before any pointer reaches this code.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace crd_fast {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

inline DType dtype_from_name(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "float64") return DType::Float64;
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  throw std::invalid_argument("crd_fast.ops._C: unsupported dtype '" + name + "'");
}

// float32 or float64 only: the kernels that have no half-precision variant parse with this.
inline DType real_dtype_from_name(const std::string& name) {
  const DType dt = dtype_from_name(name);
  if (dt != DType::Float32 && dt != DType::Float64) {
    throw std::invalid_argument("crd_fast.ops._C: dtype '" + name + "' is not supported here (float32 or float64)");
  }
  return dt;
}

// Arguments of the fused head (see csrc/cuda/crd_head_kernels.cuh for their layouts). Pointers are
// device addresses; plan/weights are the tables of crd_fast/ops/plan.py.
// Must equal crd_head::kMaxLayers of csrc/cuda/crd_head_kernels.cuh (a static_assert in crd_head.cu checks it;
// this header is compiled without CUDA, so it cannot include the kernels).
constexpr int kHeadMaxLayers = 4;

struct HeadArgs {
  std::uintptr_t maps[kHeadMaxLayers];  // per-layer (B, C_l, H_l, W_l) feature maps, operand dtype
  int num_layers;
  std::uintptr_t plan;     // int32
  std::uintptr_t weights;  // accumulation dtype (float32, or float64 for the float64 kernel)
  std::uintptr_t matrix;   // (r, c_total) operand dtype, row-major
  std::uintptr_t q;        // (r,) accumulation dtype; crd_residual: (h0 * w0, r)
  std::uintptr_t partial;  // (ceil(r / kTileR), N) accumulation dtype, scratch (unused by crd_residual)
  std::uintptr_t out;      // (N,) accumulation dtype; crd_residual: (N, r)
  int batch, h0, w0, c_total, r;
};

struct KernelAttributes {
  std::string name;
  int num_regs;
  long long local_bytes;
  long long shared_bytes;
  int binary_version;
};

namespace cpu {
// out[i] = || Z[i, :] - q ||_2 for a row-major (rows x cols) Z; q may be null (treated as 0).
void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out,
                   std::int64_t rows, std::int64_t cols);
}  // namespace cpu

#ifdef CRD_FAST_WITH_CUDA
namespace cuda {
void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out,
                   std::int64_t rows, std::int64_t cols, std::uintptr_t stream);
// The fused head: tile kernel then finish kernel, both on the given stream.
void crd_head(DType dtype, const HeadArgs& args, std::uintptr_t stream);
// The residual mode of the same tiles: out (N, r) = P' e_p - q[p mod (h0 w0)], one tile kernel, no finish.
void crd_residual(DType dtype, const HeadArgs& args, std::uintptr_t stream);
// Registers / local (spill) / static shared bytes of every head and residual kernel (needs a CUDA device).
std::vector<KernelAttributes> crd_head_attributes();
}  // namespace cuda
#endif

}  // namespace crd_fast
