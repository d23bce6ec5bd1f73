// Q8_0 skinny linear: y = x W^T (+ b) for the 1-8 rows of a decode step, W held as int8 blocks.
//
// A decode step at batch 1-8 streams every weight once; with W as 8-bit integers and one fp32
// scale per 32 of them (Q8_0: 1.125 bytes per weight instead of bf16's 2) it streams 44% fewer
// bytes. A model loaded with weight_dtype="q8_0" (loong/ops/quantized_weights.py) rounds each
// projection to Q8_0 once and keeps both forms of the same values: the int8 blocks for these
// steps and W = bf16(scale * q) as the parameter (prefill, batched steps, weight sync, export).
//
// Contract (torch reference: loong.ops.quantized_weights.linear_q8_torch):
//   linear_q8(x [M, K] bf16, qs [N, K] int8, scales [N, K / 32] fp32, bias [N] bf16 or None)
//     -> y [M, N] bf16;  1 <= M <= kMaxRows, K a multiple of 32, x's last dim contiguous,
//   y = linear_small(x, W, bias) with W[n, k] = bf16(scales[n, k / 32] * qs[n, k]), bit for bit:
//   each weight is decoded in registers exactly as torch computes W (fp32 product, rounded to
//   nearest even), and the sums run in skinny_linear.cpp's order (32 elements per
//   _mm512_dpbf16_ps into the same accumulator tiles, the same final reduction). So a
//   Q8_0 model gives the same results at 1-8 rows whichever form a step reads.
//   linear_q8_supported() is false in builds without AVX512_BF16 (torch runs then).
//
// Algorithm: as skinny_linear.cpp (W rows split over threads in contiguous ranges, read one row
// at a time in order; tiles of up to 4 x rows); per 32-element block each W row's int8 values are widened to fp32,
// multiplied by the block's scale and packed to bf16 (3 conversions and 2 multiplies per 32
// weights), then multiplied into every x row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOONG_Q8_BF16 1
#endif

namespace loong {
namespace {

constexpr int64_t kMaxRows = 8;                      // rows of x this kernel takes
constexpr int64_t kBlock = 32;                       // weights per scale (Q8_0)
constexpr int64_t kRowsW = 1;    // W rows per inner block: one sequential stream (see skinny_linear.cpp)
constexpr int64_t kParallelMinBytes = 256 * 1024;    // qs smaller than this: one thread

#ifdef LOONG_Q8_BF16
using bf16 = c10::BFloat16;

// 32 int8 weights times their block's scale -> 32 bf16, rounded as torch rounds fp32 to bf16.
inline __m512bh decode(const int8_t* q, __m512 d) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(q))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(q + 16))));
  // elements 0-15 from lo, 16-31 from hi
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, d), _mm512_mul_ps(lo, d));
}

template <int MT, int R>
inline void block(const bf16* const* xs, const int8_t* qs, const float* scales, int64_t K,
                  int64_t n0, const bf16* bias, bf16* const* ys) {
  const int64_t nb = K / kBlock;
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* qr[R];
  const float* sr[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = qs + (n0 + r) * K;
    sr[r] = scales + (n0 + r) * nb;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k = b * kBlock;
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = decode(qr[r] + k, _mm512_set1_ps(sr[r][b]));
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      if (bias != nullptr) s += static_cast<float>(bias[n0 + r]);
      ys[m][n0 + r] = bf16(s);
    }
}

template <int MT>
void rows_range(const bf16* const* xs, const int8_t* qs, const float* scales, int64_t K,
                int64_t n_lo, int64_t n_hi, const bf16* bias, bf16* const* ys) {
  int64_t n = n_lo;
  for (; n + kRowsW <= n_hi; n += kRowsW) block<MT, kRowsW>(xs, qs, scales, K, n, bias, ys);
  for (; n < n_hi; ++n) block<MT, 1>(xs, qs, scales, K, n, bias, ys);
}

void run_rows(const bf16* const* xs, int64_t M, const int8_t* qs, const float* scales,
              int64_t K, int64_t n_lo, int64_t n_hi, const bf16* bias, bf16* const* ys) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mt = std::min<int64_t>(4, M - m0);
    switch (mt) {
      case 1: rows_range<1>(xs + m0, qs, scales, K, n_lo, n_hi, bias, ys + m0); break;
      case 2: rows_range<2>(xs + m0, qs, scales, K, n_lo, n_hi, bias, ys + m0); break;
      case 3: rows_range<3>(xs + m0, qs, scales, K, n_lo, n_hi, bias, ys + m0); break;
      default: rows_range<4>(xs + m0, qs, scales, K, n_lo, n_hi, bias, ys + m0); break;
    }
  }
}
#endif  // LOONG_Q8_BF16

}  // namespace

bool linear_q8_supported() {
#ifdef LOONG_Q8_BF16
  return true;
#else
  return false;
#endif
}

at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(linear_q8_supported(), "linear_q8: this build has no AVX512_BF16 path");
  TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && scales.dim() == 2,
              "linear_q8: x [M, K], qs [N, K] and scales [N, K / 32] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && qs.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kFloat,
              "linear_q8: x bfloat16, qs int8, scales float32 expected");
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu() && scales.device().is_cpu(),
              "linear_q8: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.size(1) == K && K % kBlock == 0 && scales.size(0) == N &&
                  scales.size(1) == K / kBlock,
              "linear_q8: K=", K, " must be a multiple of 32 shared by x, qs ", qs.sizes(),
              " and scales ", scales.sizes());
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "linear_q8: 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, "linear_q8: x's last dim must be contiguous");
  TORCH_CHECK(qs.is_contiguous() && scales.is_contiguous(),
              "linear_q8: qs and scales must be contiguous");
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = &bias.value();
    TORCH_CHECK(b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == N &&
                    b->is_contiguous() && b->device().is_cpu(),
                "linear_q8: bias must be a contiguous bfloat16 [N]");
  }
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef LOONG_Q8_BF16
  if (N == 0) return y;
  const bf16* xs[kMaxRows];
  bf16* ys[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<bf16>() + m * x.stride(0);
    ys[m] = y.data_ptr<bf16>() + m * N;
  }
  const int8_t* qp = qs.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const bf16* bp = b ? b->data_ptr<bf16>() : nullptr;
  if (N * K < kParallelMinBytes || at::get_num_threads() == 1) {
    run_rows(xs, M, qp, sp, K, 0, N, bp, ys);
  } else {
    const int64_t nthr = at::get_num_threads();
    const int64_t blocks = (N + kRowsW - 1) / kRowsW;
    const int64_t per = (blocks + nthr - 1) / nthr;
    at::parallel_for(0, nthr, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n_lo = std::min(N, t * per * kRowsW);
        const int64_t n_hi = std::min(N, (t + 1) * per * kRowsW);
        if (n_lo < n_hi) run_rows(xs, M, qp, sp, K, n_lo, n_hi, bp, ys);
      }
    });
  }
#endif
  return y;
}

}  // namespace loong
