// CUDA kernels of the fused CRD head (twin of csrc/cpu/crd_head.pyx). Device code only.
//
// This one file is compiled twice: by nvcc into crd_fast.ops._C (csrc/cuda/crd_head.cu adds the host
// launchers), and at run time by NVRTC through CuPy (crd_fast/ops/cupy_jit.py) when _C was built
// without CUDA. So: no standard-library headers, C-linkage entry points, flat scalar/pointer parameters.
//
// What one launch of crd_head_tile_* computes, for a tile of kTileP patches x kTileR projection rows:
//
//   E[p, c]   = sum_{i,j} wy_i wx_j F_l[b, c - off_l, sy + i, sx + j]     (pool 3x3 + bilinear resize,
//               as separable tap bands: the plan/weights tables of crd_fast/ops/plan.py, the same
//               tables the CPU pass reads; c runs over the concatenated channels of all layers)
//   Z[p, j]   = sum_c E[p, c] M[j, c]                                      (M = P' folded, r x C_total)
//   partial[tile_r, p] = sum_{j in tile} (Z[p, j] - q[j])^2
//
// The embedding E is built chunk by chunk (kChunk channels) in shared memory straight from the raw
// layer maps and consumed there: it never reaches global memory. M is streamed through shared memory
// in (kTileR x kChunk) tiles. crd_head_finish_* then writes score[p] = sqrt(sum over r-tiles), a fixed
// order: results are deterministic (no atomics).
//
// Residual mode (crd_residual_tile_*, the position-aware head's fused part, docs/DESIGN.md "Position-aware CRD"):
// the same tile code with the other epilogue (a template flag, not a second GEMM loop), no finish kernel:
//
//   out[p, j] = Z[p, j] - q[pos(p), j]     for j < r,   pos(p) = p mod (h0 w0),   q (h0 w0, r) row-major
//
// out is (N, r) in the accumulation dtype (float64 for fp64, float32 for fp32/fp16/bf16). Every element is
// written by exactly one thread: deterministic, no atomics.
//
// fp32 and fp64 run a SIMT 4x4 register tile; fp16 and bf16 operands run on tensor cores through
// wmma 16x16x16 with fp32 accumulation (embedding values are summed in fp32 and rounded once to the
// operand type when stored to shared memory).
//
// Architectures: everything builds for sm_75 and newer except the bf16 tensor-core tile, which needs
// sm_80 (bf16 wmma fragments do not exist below it). For device passes below sm_80 crd_head_tile_bf16 is
// a stub that traps; Python never launches it there (bf16 maps are widened to float32 on such devices,
// crd_fast/ops/cuda.py operand_dtype; docs/GPU.md).
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800  // literal: the preprocessor cannot read kBf16MinArch
#define CRD_HEAD_BF16_MMA 0
#else
#define CRD_HEAD_BF16_MMA 1
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace crd_head {

// Launch geometry, written once: nvcc and NVRTC compile this file, and Python reads these lines from it
// (crd_fast/ops/kernel_config.py parses every `constexpr int kName = value;` of this block).
constexpr int kMaxLayers = 4;       // feature maps per call (the Python side checks this)
constexpr int kHeader = 4;          // ints per layer header in plan: C, H, W, channel offset
constexpr int kMaxTaps = 4;         // taps per band row (crd_fast/ops/plan.py MAX_TAPS)
constexpr int kThreads = 256;       // threads per tile block
constexpr int kTileP = 64;          // patches per block
constexpr int kTileR = 64;          // projection rows per block
constexpr int kFinishThreads = 256; // threads per block of crd_head_finish_*
constexpr int kBf16MinArch = 800;   // bf16 wmma needs sm_80; below it the bf16 entry traps (see CRD_HEAD_BF16_MMA)
typedef long long i64;

static_assert(kMaxLayers * kTileP == kThreads, "one thread loads one (layer, patch) tap record");

// ---- operand traits -------------------------------------------------------------------------------
template <typename T>
struct Traits;
template <>
struct Traits<float> {
  typedef float Acc;
  static constexpr bool kTensor = false;
  static constexpr int kChunk = 16;
  static constexpr int kLd = kChunk + 1;  // odd stride: column reads hit 16 distinct banks
};
template <>
struct Traits<double> {
  typedef double Acc;
  static constexpr bool kTensor = false;
  static constexpr int kChunk = 16;
  static constexpr int kLd = kChunk + 1;
};
template <>
struct Traits<__half> {
  typedef float Acc;
  static constexpr bool kTensor = true;
  static constexpr int kChunk = 32;       // two k=16 wmma steps per chunk
  static constexpr int kLd = kChunk + 8;  // multiple of 8 elements (wmma ldm rule), 80-byte rows
};
template <>
struct Traits<__nv_bfloat16> {
  typedef float Acc;
  static constexpr bool kTensor = true;
  static constexpr int kChunk = 32;
  static constexpr int kLd = kChunk + 8;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Store<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

template <typename T>
__device__ __forceinline__ const T* pick(int l, const T* f0, const T* f1, const T* f2, const T* f3) {
  return l == 0 ? f0 : (l == 1 ? f1 : (l == 2 ? f2 : f3));
}

// ---- shared state of one block ---------------------------------------------------------------------
template <typename T>
struct Shared {
  typedef typename Traits<T>::Acc Acc;
  int hdr[kMaxLayers * kHeader];        // C, H, W, offset per layer
  int batch[kTileP];                    // b of each patch of the tile
  int tap[kMaxLayers][4][kTileP];       // sy, ny, sx, nx per (layer, patch); ny = 0 for patches past N
  Acc w[kMaxLayers][2 * kMaxTaps][kTileP];  // wy[4], wx[4] per (layer, patch)
  __align__(32) T e[kTileP * Traits<T>::kLd];  // embedding chunk, [patch][channel]
  __align__(32) T m[kTileR * Traits<T>::kLd];  // matrix tile, [row][channel]
};

// Taps of every (layer, patch) of the tile into shared memory: one record per thread.
template <typename T>
__device__ __forceinline__ void load_taps(Shared<T>& s, int num_layers, const int* __restrict__ plan,
                                          const typename Traits<T>::Acc* __restrict__ weights, i64 p0, i64 n,
                                          int h0, int w0) {
  const int t = threadIdx.x;
  if (t < kMaxLayers * kHeader) s.hdr[t] = t < num_layers * kHeader ? plan[t] : 0;
  const int l = t / kTileP;
  const int pp = t % kTileP;
  const i64 p = p0 + pp;
  const bool valid = l < num_layers && p < n;
  int y = 0, x = 0, b = 0;
  if (p < n) {
    const i64 hw = (i64)h0 * w0;
    b = (int)(p / hw);
    const int rem = (int)(p - (i64)b * hw);
    y = rem / w0;
    x = rem - y * w0;
  }
  if (l == 0) s.batch[pp] = b;
  const int rows = h0 + w0;
  const int* taps = plan + num_layers * kHeader + l * rows * 2;
  const typename Traits<T>::Acc* wl = weights + (i64)l * rows * kMaxTaps;
  s.tap[l][0][pp] = valid ? taps[2 * y] : 0;
  s.tap[l][1][pp] = valid ? taps[2 * y + 1] : 0;
  s.tap[l][2][pp] = valid ? taps[2 * (h0 + x)] : 0;
  s.tap[l][3][pp] = valid ? taps[2 * (h0 + x) + 1] : 0;
#pragma unroll
  for (int i = 0; i < kMaxTaps; ++i) {
    s.w[l][i][pp] = valid ? wl[y * kMaxTaps + i] : 0;
    s.w[l][kMaxTaps + i][pp] = valid ? wl[(h0 + x) * kMaxTaps + i] : 0;
  }
}

// Embedding value of concatenated channel c at tile patch pp: pooled and resized, from the raw map.
template <typename T>
__device__ __forceinline__ typename Traits<T>::Acc embed_value(const Shared<T>& s, int num_layers, int c, int pp,
                                                               const T* f0, const T* f1, const T* f2,
                                                               const T* f3) {
  typedef typename Traits<T>::Acc Acc;
  Acc v = 0;
#pragma unroll
  for (int l = 0; l < kMaxLayers; ++l) {
    if (l < num_layers) {
      const int C = s.hdr[l * kHeader + 0];
      const int cl = c - s.hdr[l * kHeader + 3];
      if (cl >= 0 && cl < C) {
        const int H = s.hdr[l * kHeader + 1];
        const int W = s.hdr[l * kHeader + 2];
        const int sy = s.tap[l][0][pp], ny = s.tap[l][1][pp];
        const int sx = s.tap[l][2][pp], nx = s.tap[l][3][pp];
        const T* src = pick(l, f0, f1, f2, f3) + ((i64)s.batch[pp] * C + cl) * H * W + (i64)sy * W + sx;
#pragma unroll
        for (int i = 0; i < kMaxTaps; ++i) {
          if (i < ny) {
            Acc row = 0;
#pragma unroll
            for (int j = 0; j < kMaxTaps; ++j) {
              if (j < nx) row += s.w[l][kMaxTaps + j][pp] * to_acc(src[i * W + j]);
            }
            v += s.w[l][i][pp] * row;
          }
        }
      }
    }
  }
  return v;
}

// Fill the embedding chunk [k0, k0 + kChunk) and the matrix tile rows [j0, j0 + kTileR) x that chunk.
template <typename T>
__device__ __forceinline__ void load_chunk(Shared<T>& s, int num_layers, const T* f0, const T* f1, const T* f2,
                                           const T* f3, const T* __restrict__ matrix, int k0, int j0, int c_total,
                                           int r) {
  constexpr int kChunk = Traits<T>::kChunk;
  constexpr int kLd = Traits<T>::kLd;
  const int t = threadIdx.x;
  // Embedding: each thread keeps its patch (t % kTileP); consecutive threads read neighbouring x.
  const int pp = t % kTileP;
#pragma unroll
  for (int k = t / kTileP; k < kChunk; k += kThreads / kTileP) {
    const int c = k0 + k;
    typename Traits<T>::Acc v = 0;
    if (c < c_total) v = embed_value(s, num_layers, c, pp, f0, f1, f2, f3);
    s.e[pp * kLd + k] = Store<T>::from(v);
  }
  // Matrix tile: consecutive threads read consecutive channels of one row (row-major M, coalesced).
#pragma unroll
  for (int e = t; e < kTileR * kChunk; e += kThreads) {
    const int jj = e / kChunk;
    const int kk = e % kChunk;
    const int j = j0 + jj;
    const int c = k0 + kk;
    s.m[jj * kLd + kk] = (j < r && c < c_total) ? matrix[(i64)j * c_total + c] : Store<T>::from(0);
  }
}

// ---- fp32 / fp64: SIMT register tile ----------------------------------------------------------------
// Thread (ty, tx) = (t / 16, t % 16) owns patches ty + 16 i and rows tx + 16 j, i, j < 4.
// kResidual selects the epilogue: false, sum_j (Z - q_j)^2 into partial (dst); true, Z - q[pos(p)] into out (dst).
template <typename T, bool kResidual>
__device__ __forceinline__ void tile_simt(Shared<T>& s, int num_layers, const T* f0, const T* f1, const T* f2,
                                          const T* f3, const T* __restrict__ matrix, const T* __restrict__ q,
                                          T* __restrict__ dst, i64 p0, i64 n, i64 hw, int j0, int c_total, int r) {
  constexpr int kChunk = Traits<T>::kChunk;
  constexpr int kLd = Traits<T>::kLd;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  for (int k0 = 0; k0 < c_total; k0 += kChunk) {
    load_chunk(s, num_layers, f0, f1, f2, f3, matrix, k0, j0, c_total, r);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = s.e[(ty + 16 * i) * kLd + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = s.m[(tx + 16 * j) * kLd + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

  if constexpr (kResidual) {
    // out[p, row] = Z - q[pos(p), row]: for each (i, j), the 16 threads sharing ty write 16 consecutive rows.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int pp = ty + 16 * i;
      const i64 p = p0 + pp;
      if (p < n) {
        const i64 pos = p - (i64)s.batch[pp] * hw;  // p mod (h0 w0), from the batch index load_taps stored
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = j0 + tx + 16 * j;
          if (row < r) dst[p * r + row] = acc[i][j] - q[pos * r + row];
        }
      }
    }
  } else {
    // Epilogue: rows past r have acc = 0 (zero matrix rows) and q = 0 there, so they add nothing.
    T qv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = j0 + tx + 16 * j;
      qv[j] = row < r ? q[row] : T(0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T sum = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const T d = acc[i][j] - qv[j];
        sum += d * d;
      }
      // the 16 threads sharing ty are one aligned half-warp: reduce over tx with xor shuffles
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const i64 p = p0 + ty + 16 * i;
      if (tx == 0 && p < n) dst[(i64)blockIdx.y * n + p] = sum;
    }
  }
}

// ---- fp16 / bf16: tensor cores (wmma m16n16k16, fp32 accumulators) ------------------------------------
// Warp w owns the 16 patches (w / 2) * 16 and the 32 rows (w % 2) * 32 of the 64 x 64 tile.
// kResidual selects the epilogue, as for tile_simt.
template <typename T, bool kResidual>
__device__ __forceinline__ void tile_tensor(Shared<T>& s, float* c_tile, int num_layers, const T* f0, const T* f1,
                                            const T* f2, const T* f3, const T* __restrict__ matrix,
                                            const float* __restrict__ q, float* __restrict__ dst, i64 p0, i64 n,
                                            i64 hw, int j0, int c_total, int r) {
  namespace wmma = nvcuda::wmma;
  constexpr int kChunk = Traits<T>::kChunk;
  constexpr int kLd = Traits<T>::kLd;
  constexpr int kLdc = kTileR + 4;
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2;
  const int wn = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int k0 = 0; k0 < c_total; k0 += kChunk) {
    load_chunk(s, num_layers, f0, f1, f2, f3, matrix, k0, j0, c_total, r);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, s.e + (wm * 16) * kLd + kk, kLd);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        // B = M^T (channels x rows); M tile is [row][channel], i.e. B in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, s.m + ((wn + t) * 16) * kLd + kk, kLd);
        wmma::mma_sync(acc[t], a, b, acc[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    wmma::store_matrix_sync(c_tile + (wm * 16) * kLdc + (wn + t) * 16, acc[t], kLdc, wmma::mem_row_major);
  }
  __syncthreads();

  if constexpr (kResidual) {
    // out[p, row] = Z - q[pos(p), row]: consecutive threads take consecutive rows of one patch (coalesced rows of
    // out and q, conflict-free reads of c_tile).
    for (int e = threadIdx.x; e < kTileP * kTileR; e += kThreads) {
      const int pp = e / kTileR;
      const int jj = e % kTileR;
      const i64 p = p0 + pp;
      const int row = j0 + jj;
      if (p < n && row < r) {
        const i64 pos = p - (i64)s.batch[pp] * hw;
        dst[p * r + row] = c_tile[pp * kLdc + jj] - q[pos * r + row];
      }
    }
  } else {
    // Epilogue: 4 consecutive threads per patch, 16 rows each, then a 4-lane shuffle reduction.
    const int pp = threadIdx.x / 4;
    const int part = threadIdx.x % 4;
    float sum = 0.0f;
#pragma unroll
    for (int jj = part * 16; jj < part * 16 + 16; ++jj) {
      const int row = j0 + jj;
      const float d = c_tile[pp * kLdc + jj] - (row < r ? q[row] : 0.0f);
      sum += d * d;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const i64 p = p0 + pp;
    if (part == 0 && p < n) dst[(i64)blockIdx.y * n + p] = sum;
  }
}

template <typename Acc>
__device__ __forceinline__ void finish(const Acc* __restrict__ partial, Acc* __restrict__ out, i64 n, int tiles) {
  const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n) return;
  Acc sum = 0;
  for (int t = 0; t < tiles; ++t) sum += partial[(i64)t * n + p];
  out[p] = acc_sqrt(sum);
}

}  // namespace crd_head

// ---- C-linkage entry points (the names CuPy looks up; crd_head.cu launches the same ones) -------------
// grid = (ceil(N / kTileP), ceil(r / kTileR)), block = kThreads; N = batch * h0 * w0.
// crd_head_tile_*: dst is partial, (ceil(r / kTileR), N); every entry of it and of the finish's out is written.
// crd_residual_tile_*: q is (h0 * w0, r), dst is out, (N, r); every entry of it is written.

#define CRD_HEAD_SIMT_ENTRY(NAME, T, RESIDUAL)                                                              \
  extern "C" __global__ void __launch_bounds__(crd_head::kThreads)                                          \
      NAME(const T* f0, const T* f1, const T* f2, const T* f3, int num_layers, const int* plan,             \
           const T* weights, const T* matrix, const T* q, T* dst, int batch, int h0, int w0, int c_total,   \
           int r) {                                                                                          \
    __shared__ crd_head::Shared<T> s;                                                                       \
    const crd_head::i64 hw = (crd_head::i64)h0 * w0;                                                        \
    const crd_head::i64 n = (crd_head::i64)batch * hw;                                                      \
    const crd_head::i64 p0 = (crd_head::i64)blockIdx.x * crd_head::kTileP;                                  \
    crd_head::load_taps<T>(s, num_layers, plan, weights, p0, n, h0, w0);                                    \
    __syncthreads();                                                                                         \
    crd_head::tile_simt<T, RESIDUAL>(s, num_layers, f0, f1, f2, f3, matrix, q, dst, p0, n, hw,              \
                                     (int)blockIdx.y * crd_head::kTileR, c_total, r);                       \
  }

#define CRD_HEAD_TENSOR_SIGNATURE(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(crd_head::kThreads)                                          \
      NAME(const T* f0, const T* f1, const T* f2, const T* f3, int num_layers, const int* plan,             \
           const float* weights, const T* matrix, const float* q, float* dst, int batch, int h0, int w0,    \
           int c_total, int r)

#define CRD_HEAD_TENSOR_ENTRY(NAME, T, RESIDUAL)                                                            \
  CRD_HEAD_TENSOR_SIGNATURE(NAME, T) {                                                                      \
    __shared__ crd_head::Shared<T> s;                                                                       \
    __shared__ __align__(32) float c_tile[crd_head::kTileP * (crd_head::kTileR + 4)];                       \
    const crd_head::i64 hw = (crd_head::i64)h0 * w0;                                                        \
    const crd_head::i64 n = (crd_head::i64)batch * hw;                                                      \
    const crd_head::i64 p0 = (crd_head::i64)blockIdx.x * crd_head::kTileP;                                  \
    crd_head::load_taps<T>(s, num_layers, plan, weights, p0, n, h0, w0);                                    \
    __syncthreads();                                                                                         \
    crd_head::tile_tensor<T, RESIDUAL>(s, c_tile, num_layers, f0, f1, f2, f3, matrix, q, dst, p0, n, hw,    \
                                       (int)blockIdx.y * crd_head::kTileR, c_total, r);                     \
  }

CRD_HEAD_SIMT_ENTRY(crd_head_tile_f32, float, false)
CRD_HEAD_SIMT_ENTRY(crd_head_tile_f64, double, false)
CRD_HEAD_TENSOR_ENTRY(crd_head_tile_f16, __half, false)
CRD_HEAD_SIMT_ENTRY(crd_residual_tile_f32, float, true)
CRD_HEAD_SIMT_ENTRY(crd_residual_tile_f64, double, true)
CRD_HEAD_TENSOR_ENTRY(crd_residual_tile_f16, __half, true)
#if CRD_HEAD_BF16_MMA
CRD_HEAD_TENSOR_ENTRY(crd_head_tile_bf16, __nv_bfloat16, false)
CRD_HEAD_TENSOR_ENTRY(crd_residual_tile_bf16, __nv_bfloat16, true)
#else
CRD_HEAD_TENSOR_SIGNATURE(crd_head_tile_bf16, __nv_bfloat16) { __trap(); }      // never launched below sm_80
CRD_HEAD_TENSOR_SIGNATURE(crd_residual_tile_bf16, __nv_bfloat16) { __trap(); }  // never launched below sm_80
#endif

// score[p] = sqrt(sum_t partial[t, p]); grid = ceil(N / kFinishThreads), block = kFinishThreads.
extern "C" __global__ void crd_head_finish_f32(const float* partial, float* out, long long n, int tiles) {
  crd_head::finish<float>(partial, out, n, tiles);
}
extern "C" __global__ void crd_head_finish_f64(const double* partial, double* out, long long n, int tiles) {
  crd_head::finish<double>(partial, out, n, tiles);
}
