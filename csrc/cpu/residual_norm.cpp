// CPU residual-norm epilogue: the last step of CRD scoring after the projection Z = Y P^T done by
// BLAS. With q = P mu it gives ||P (y - mu)|| without materialising Y - mu or (Z - q)^2.
#include <cmath>

#include "common.h"

namespace crd_fast {
namespace cpu {
namespace {

template <typename T>
void residual_norm_impl(const T* z, const T* q, T* out, std::int64_t rows, std::int64_t cols) {
#ifdef CRD_FAST_WITH_OPENMP
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
#endif
  for (std::int64_t i = 0; i < rows; ++i) {
    const T* row = z + i * cols;
    // Accumulate in double: a d = 1536 sum of squares in float loses ~3 digits otherwise.
    double acc = 0.0;
    if (q != nullptr) {
      for (std::int64_t j = 0; j < cols; ++j) {
        const double v = static_cast<double>(row[j]) - static_cast<double>(q[j]);
        acc += v * v;
      }
    } else {
      for (std::int64_t j = 0; j < cols; ++j) {
        const double v = static_cast<double>(row[j]);
        acc += v * v;
      }
    }
    out[i] = static_cast<T>(std::sqrt(acc));
  }
}

}  // namespace

void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out,
                   std::int64_t rows, std::int64_t cols) {
  switch (dtype) {
    case DType::Float32:
      residual_norm_impl(reinterpret_cast<const float*>(z), reinterpret_cast<const float*>(q),
                         reinterpret_cast<float*>(out), rows, cols);
      break;
    case DType::Float64:
      residual_norm_impl(reinterpret_cast<const double*>(z), reinterpret_cast<const double*>(q),
                         reinterpret_cast<double*>(out), rows, cols);
      break;    default:
      throw std::invalid_argument("residual_norm: float32 or float64 only");
  }
}

}  // namespace cpu
}  // namespace crd_fast
