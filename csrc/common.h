// Shared declarations of the crd_fast compiled module. Functions take raw pointers (as integers),
// shapes and, for CUDA, a stream handle, so the module never links libtorch. Python validates
// devices, dtypes, shapes and contiguity before any pointer reaches this code.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace crd_fast {

enum class DType : int { Float32 = 0, Float64 = 1 };

inline DType dtype_from_name(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "float64") return DType::Float64;
  throw std::invalid_argument("crd_fast._C: unsupported dtype '" + name + "' (float32 or float64)");
}

namespace cpu {
// out[i] = || Z[i, :] - q ||_2 for a row-major (rows x cols) Z; q may be null (treated as 0).
void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out,
                   std::int64_t rows, std::int64_t cols);
}  // namespace cpu

#ifdef CRD_FAST_WITH_CUDA
namespace cuda {
void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out,
                   std::int64_t rows, std::int64_t cols, std::uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace crd_fast
