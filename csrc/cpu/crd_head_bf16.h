// CPU fused pass of the CRD head over bfloat16 projections (included by csrc/cpu/crd_head.pyx).
//
// The bf16 head (docs/DESIGN.md "Compute precision") projects each layer with a bf16 GEMM whose result
// stays bf16; this pass reads those Z_l (B, H_l, W_l, r) directly, widening each element to float32 on
// load, so no float32 copy of the projections is ever made. The arithmetic is the float32 pass's
// (pool/resize band taps of crd_fast/ops/plan.py, float32 accumulation, the norm's sum of squares in
// double), one output row (b, y) per call; the Cython module runs the rows in parallel.
//
// The row functions are compiled three times: for AVX-512 (F/BW/VL/DQ + FMA), AVX2 + FMA, and the
// baseline, and ``crd_bf16::select_row`` picks one at run time (the wheel itself targets plain x86-64).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace crd_bf16 {

// Must match crd_fast/ops/plan.py: ints per layer header, taps per band row.
constexpr std::ptrdiff_t kHeader = 4;
constexpr std::ptrdiff_t kMaxTaps = 4;

#if defined(__GNUC__) || defined(__clang__)
#define CRD_BF16_INLINE inline __attribute__((always_inline))
#define CRD_BF16_RESTRICT __restrict__
#else
#define CRD_BF16_INLINE inline
#define CRD_BF16_RESTRICT
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define CRD_BF16_X86 1
#endif

// One call's operands: what crd_fast/ops/cpu.py checked and handed over as pointers.
struct Pass {
  const std::uint16_t* const* z;  // per layer: (B, H_l, W_l, r) bf16 bit patterns
  std::ptrdiff_t num_layers;
  const std::int32_t* plan;  // crd_fast/ops/plan.py tables
  const float* weights;
  const float* q;        // (r,) shared (q_step = 0) or (H0, W0, r) per position (q_step = r)
  std::ptrdiff_t q_step;
  float* out;            // (B, H0, W0) norms, or (B, H0, W0, r) residual vectors (residual = true)
  std::ptrdiff_t h0, w0, r;
  bool residual;
};

CRD_BF16_INLINE float widen(std::uint16_t v) {
  const std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;  // bf16 is the top half of a float32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dst[k] = sum_i w[i] * src_i[k] over n (1..4) bf16 rows: one sweep over k whatever the tap count.
CRD_BF16_INLINE void taps_bf16(float* CRD_BF16_RESTRICT dst, const std::uint16_t* const* src, const float* w,
                               std::ptrdiff_t n, std::ptrdiff_t r) {
  const std::uint16_t* CRD_BF16_RESTRICT a = src[0];
  const float w0 = w[0];
  if (n == 1) {
    for (std::ptrdiff_t k = 0; k < r; ++k) dst[k] = w0 * widen(a[k]);
    return;
  }
  const std::uint16_t* CRD_BF16_RESTRICT b = src[1];
  const float w1 = w[1];
  if (n == 2) {
    for (std::ptrdiff_t k = 0; k < r; ++k) dst[k] = w0 * widen(a[k]) + w1 * widen(b[k]);
    return;
  }
  const std::uint16_t* CRD_BF16_RESTRICT c = src[2];
  const float w2 = w[2];
  if (n == 3) {
    for (std::ptrdiff_t k = 0; k < r; ++k) dst[k] = w0 * widen(a[k]) + w1 * widen(b[k]) + w2 * widen(c[k]);
    return;
  }
  const std::uint16_t* CRD_BF16_RESTRICT d = src[3];
  const float w3 = w[3];
  for (std::ptrdiff_t k = 0; k < r; ++k)
    dst[k] = w0 * widen(a[k]) + w1 * widen(b[k]) + w2 * widen(c[k]) + w3 * widen(d[k]);
}

// acc[k] += sum_i w[i] * src[i * step + k], k < n_k, over n (1..4) float32 rows ``step`` floats apart.
CRD_BF16_INLINE void add_taps(float* CRD_BF16_RESTRICT acc, const float* CRD_BF16_RESTRICT src, std::ptrdiff_t step,
                              const float* w, std::ptrdiff_t n, std::ptrdiff_t n_k) {
  const float* a = src;
  const float* b = src + step;
  const float* c = src + 2 * step;
  const float* d = src + 3 * step;
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  switch (n) {
    case 1:
      for (std::ptrdiff_t k = 0; k < n_k; ++k) acc[k] += w0 * a[k];
      break;
    case 2:
      for (std::ptrdiff_t k = 0; k < n_k; ++k) acc[k] += w0 * a[k] + w1 * b[k];
      break;
    case 3:
      for (std::ptrdiff_t k = 0; k < n_k; ++k) acc[k] += w0 * a[k] + w1 * b[k] + w2 * c[k];
      break;
    default:
      for (std::ptrdiff_t k = 0; k < n_k; ++k) acc[k] += w0 * a[k] + w1 * b[k] + w2 * c[k] + w3 * d[k];
      break;
  }
}

// Channels per block: one block's accumulator and pooled-row scratch (W x kBlock floats each) stay in L1.
constexpr std::ptrdiff_t kBlock = 128;

// Double partial sums per output column in the norm (a multiple of kBlock's divisors, a power of two).
constexpr std::ptrdiff_t kLanes = 16;

// Scratch floats one thread needs: the norm's kLanes double partial sums per output column, the accumulator
// (w0 x kBlock) and one pooled source row (max_w x kBlock).
inline std::ptrdiff_t scratch_floats(std::ptrdiff_t w0, std::ptrdiff_t max_w) {
  return 2 * kLanes * w0 + (w0 + max_w) * kBlock;
}

// For channels [k0, k0 + kb) of output row (b, y): acc[x * acc_step + k] = sum_l pool/resize(Z_l)[b, y, x, k0 + k]
// - q_(y, x)[k0 + k]; tmp holds one layer's vertically pooled source row (max W_l x kBlock floats).
CRD_BF16_INLINE void accumulate_block(const Pass& p, std::ptrdiff_t b, std::ptrdiff_t y, std::ptrdiff_t k0,
                                      std::ptrdiff_t kb, float* CRD_BF16_RESTRICT acc, std::ptrdiff_t acc_step,
                                      float* CRD_BF16_RESTRICT tmp) {
  const std::ptrdiff_t h0 = p.h0, w0 = p.w0, r = p.r;
  const std::ptrdiff_t bands = h0 + w0;
  for (std::ptrdiff_t x = 0; x < w0; ++x) {
    const float* CRD_BF16_RESTRICT qx = p.q + (y * w0 + x) * p.q_step + k0;
    float* CRD_BF16_RESTRICT dst = acc + x * acc_step;
    for (std::ptrdiff_t k = 0; k < kb; ++k) dst[k] = -qx[k];
  }
  for (std::ptrdiff_t l = 0; l < p.num_layers; ++l) {
    const std::ptrdiff_t h = p.plan[l * kHeader + 1];
    const std::ptrdiff_t w = p.plan[l * kHeader + 2];
    const std::int32_t* taps = p.plan + p.num_layers * kHeader + l * bands * 2;
    const float* wl = p.weights + l * bands * kMaxTaps;
    const std::ptrdiff_t sy = taps[2 * y], ny = taps[2 * y + 1];
    const std::uint16_t* src[kMaxTaps];
    // vertical: tmp[j] = sum_i wy_i Z_l[b, sy + i, j]
    for (std::ptrdiff_t j = 0; j < w; ++j) {
      for (std::ptrdiff_t i = 0; i < ny; ++i) src[i] = p.z[l] + ((b * h + sy + i) * w + j) * r + k0;
      taps_bf16(tmp + j * kBlock, src, wl + y * kMaxTaps, ny, kb);
    }
    // horizontal: acc[x] += sum_i wx_i tmp[sx + i] (the band's taps are contiguous columns of tmp)
    for (std::ptrdiff_t x = 0; x < w0; ++x) {
      const std::ptrdiff_t sx = taps[2 * (h0 + x)], nx = taps[2 * (h0 + x) + 1];
      add_taps(acc + x * acc_step, tmp + sx * kBlock, kBlock, wl + (h0 + x) * kMaxTaps, nx, kb);
    }
  }
}

// sums[x * kLanes + i] += the squares of acc's columns x (kb channels each, ``step`` floats apart), channel k
// into lane k % kLanes: kLanes independent double accumulators vectorise without reassociation flags, and a
// d = 1536 sum of squares keeps full float32 precision.
CRD_BF16_INLINE void add_squares(double* CRD_BF16_RESTRICT sums, const float* CRD_BF16_RESTRICT acc,
                                 std::ptrdiff_t step, std::ptrdiff_t w0, std::ptrdiff_t kb) {
  for (std::ptrdiff_t x = 0; x < w0; ++x) {
    const float* CRD_BF16_RESTRICT v = acc + x * step;
    double s[kLanes];
    for (std::ptrdiff_t i = 0; i < kLanes; ++i) s[i] = sums[kLanes * x + i];
    std::ptrdiff_t k = 0;
    for (; k + kLanes <= kb; k += kLanes)
      for (std::ptrdiff_t i = 0; i < kLanes; ++i) s[i] += static_cast<double>(v[k + i]) * v[k + i];
    for (; k < kb; ++k) s[k % kLanes] += static_cast<double>(v[k]) * v[k];
    for (std::ptrdiff_t i = 0; i < kLanes; ++i) sums[kLanes * x + i] = s[i];
  }
}

// One block of channels [k0, k0 + kb) of an output row: accumulate, then (norm pass) add its squares.
CRD_BF16_INLINE void run_block(const Pass& p, std::ptrdiff_t row, std::ptrdiff_t k0, std::ptrdiff_t kb, float* acc,
                               float* tmp, double* sums) {
  const std::ptrdiff_t b = row / p.h0, y = row % p.h0;
  if (p.residual) {  // accumulated in place in the output row
    accumulate_block(p, b, y, k0, kb, p.out + row * p.w0 * p.r + k0, p.r, tmp);
    return;
  }
  accumulate_block(p, b, y, k0, kb, acc, kBlock, tmp);
  add_squares(sums, acc, kBlock, p.w0, kb);
}

// One output row (row = b * h0 + y), block of channels by block: the norms ||sum - q|| into out[b, y, :], or
// with p.residual the residual vectors into out[b, y, :, :]. ``scratch`` is scratch_floats(w0, max_w) floats:
// the norm's double partial sums, then the accumulator, then tmp.
CRD_BF16_INLINE void run_row(const Pass& p, std::ptrdiff_t row, float* scratch) {
  const std::ptrdiff_t w0 = p.w0, r = p.r;
  double* sums = reinterpret_cast<double*>(scratch);  // kLanes per column
  float* acc = scratch + 2 * kLanes * w0;
  float* tmp = acc + w0 * kBlock;
  for (std::ptrdiff_t i = 0; i < kLanes * w0; ++i) sums[i] = 0.0;
  std::ptrdiff_t k0 = 0;
  for (; k0 + kBlock <= r; k0 += kBlock)  // full blocks: a constant trip count for the compiler
    run_block(p, row, k0, kBlock, acc, tmp, sums);
  if (k0 < r) run_block(p, row, k0, r - k0, acc, tmp, sums);
  if (p.residual) return;
  for (std::ptrdiff_t x = 0; x < w0; ++x) {
    double* s = sums + kLanes * x;
    for (std::ptrdiff_t width = kLanes / 2; width > 0; width /= 2)  // pairwise: a fixed order
      for (std::ptrdiff_t i = 0; i < width; ++i) s[i] += s[i + width];
    p.out[row * w0 + x] = static_cast<float>(std::sqrt(s[0]));
  }
}

typedef void (*RowFn)(const Pass*, std::ptrdiff_t, float*);

static void row_baseline(const Pass* p, std::ptrdiff_t row, float* scratch) { run_row(*p, row, scratch); }

#ifdef CRD_BF16_X86
__attribute__((target("avx2,fma"))) static void row_avx2(const Pass* p, std::ptrdiff_t row, float* scratch) {
  run_row(*p, row, scratch);
}

#if defined(__clang__)  // clang's target attribute takes no tuning options
#define CRD_BF16_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#else  // GCC: full-width vectors (its generic tuning may prefer 256-bit ones)
#define CRD_BF16_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"
#endif
__attribute__((target(CRD_BF16_AVX512))) static void row_avx512(const Pass* p, std::ptrdiff_t row, float* scratch) {
  run_row(*p, row, scratch);
}
#endif

// Instruction sets this processor runs, best first: 2 = avx512, 1 = avx2, 0 = baseline.
static int best_isa() {
#ifdef CRD_BF16_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

// The row function for ``isa`` (-1: the best this processor runs); nullptr when it cannot run ``isa``.
static RowFn select_row(int isa) {
  const int best = best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return nullptr;
#ifdef CRD_BF16_X86
  if (isa == 2) return row_avx512;
  if (isa == 1) return row_avx2;
#endif
  return isa == 0 ? row_baseline : nullptr;
}

}  // namespace crd_bf16
