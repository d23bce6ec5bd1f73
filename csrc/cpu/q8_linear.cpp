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
// Algorithm: skinny_linear.cpp's, by the same templates (skinny_tiles.h: W rows split over
// threads in contiguous ranges, read one row at a time in order; tiles of up to 4 x rows), so
// the summing order is one piece of code. Only the load differs: per 32-element block a W row's
// int8 values are widened to fp32, multiplied by the block's scale and packed to bf16 (3
// conversions and 2 multiplies per 32 weights), then multiplied into every x row.

#include "skinny_tiles.h"

namespace loong {
namespace {

constexpr int64_t kBlock = 32;                       // weights per scale (Q8_0)
constexpr int64_t kRowsW = 1;    // W rows per inner block: one sequential stream (see skinny_linear.cpp)
constexpr int64_t kParallelMinBytes = 256 * 1024;    // qs smaller than this: one thread

#ifdef LOONG_SKINNY_TILES_BF16
// W as Q8_0 blocks (qs [N, K] int8, scales [N, K / 32] fp32): the skinny_tiles.h `Rows` policy.
struct Q8Rows {
  const int8_t* qs;
  const float* scales;
  int64_t K;
  // 32 int8 weights times their block's scale -> 32 bf16, rounded as torch rounds fp32 to bf16.
  __m512bh load(int64_t n, int64_t k) const {
    const int8_t* q = qs + n * K + k;
    const __m512 d = _mm512_set1_ps(scales[n * (K / kBlock) + k / kBlock]);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(q))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(q + 16))));
    // elements 0-15 from lo, 16-31 from hi
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, d), _mm512_mul_ps(lo, d));
  }
  // Never reached: linear_q8 checks that K is a multiple of 32, so there is no tail.
  __m512bh load_tail(int64_t, int64_t, __mmask32) const {
    TORCH_INTERNAL_ASSERT(false, "linear_q8: K is a multiple of 32");
    return (__m512bh)_mm512_setzero_si512();
  }
  void prefetch(int64_t, int64_t) const {}
};
#endif  // LOONG_SKINNY_TILES_BF16

}  // namespace

bool linear_q8_supported() {
#ifdef LOONG_SKINNY_TILES_BF16
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
  const int64_t K = x.size(1), N = qs.size(0);
  TORCH_CHECK(qs.size(1) == K && K % kBlock == 0 && scales.size(0) == N &&
                  scales.size(1) == K / kBlock,
              "linear_q8: K=", K, " must be a multiple of 32 shared by x, qs ", qs.sizes(),
              " and scales ", scales.sizes());
  TORCH_CHECK(qs.is_contiguous() && scales.is_contiguous(),
              "linear_q8: qs and scales must be contiguous");
  const at::Tensor* b = skinny::check_x_and_bias("linear_q8", x, N, bias);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
#ifdef LOONG_SKINNY_TILES_BF16
  if (N == 0) return y;
  skinny::linear<kRowsW>(x, Q8Rows{qs.data_ptr<int8_t>(), scales.data_ptr<float>(), K}, N, N * K,
                         kParallelMinBytes, b, y);
#endif
  return y;
}

}  // namespace loong
