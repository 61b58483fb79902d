// CUDA twin of cpu/residual_norm.cpp: one warp per row, fp32 rows accumulate in fp32 per lane and
// are reduced by shuffles; fp64 rows accumulate in fp64.
#include <cuda_runtime.h>

#include <string>

#include "common.h"

namespace crd_fast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void residual_norm_kernel(const T* __restrict__ z, const T* __restrict__ q, T* __restrict__ out,
                                     std::int64_t rows, std::int64_t cols) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* zr = z + row * cols;
  T acc = T(0);
  for (std::int64_t j = lane; j < cols; j += 32) {
    const T v = zr[j] - (q != nullptr ? q[j] : T(0));
    acc += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[row] = sqrt(acc);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("crd_fast CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename T>
void launch(std::uintptr_t z, std::uintptr_t q, std::uintptr_t out, std::int64_t rows, std::int64_t cols,
            cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 block(32 * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  residual_norm_kernel<T><<<grid, block, 0, stream>>>(reinterpret_cast<const T*>(z), reinterpret_cast<const T*>(q),
                                                       reinterpret_cast<T*>(out), rows, cols);
  check(cudaGetLastError(), "residual_norm launch");
}

}  // namespace

void residual_norm(DType dtype, std::uintptr_t z, std::uintptr_t q, std::uintptr_t out, std::int64_t rows,
                   std::int64_t cols, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == DType::Float32) launch<float>(z, q, out, rows, cols, s);
  else if (dtype == DType::Float64) launch<double>(z, q, out, rows, cols, s);
  else throw std::invalid_argument("residual_norm: float32 or float64 only");
}

}  // namespace cuda
}  // namespace crd_fast
