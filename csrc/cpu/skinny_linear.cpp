// Skinny linear: y = x W^T (+ b) for the few rows of a decode step, streaming the weight once.
//
// At batch 1-8 a projection is a weight read: every element of W is used once per row of x,
// so the time is W's bytes over the memory bandwidth. oneDNN's bf16 GEMM reaches about half of
// the read bandwidth there (and less at 4-8 rows, where it re-reads W); this kernel reads each
// W row once for all rows of x.
//
// Contract (bf16 only; loong/ops/__init__.py routes everything else to torch's F.linear):
//   linear_small(x [M, K] bf16, w [N, K] bf16, bias [N] bf16 or None) -> y [M, N] bf16
//   1 <= M <= kMaxRows; x's last dim contiguous (any row stride); w contiguous.
//   y[m, n] = bf16(sum_k float(x[m, k]) * float(w[n, k]) + float(bias[n])): products of two
//   bf16 are exact in fp32, the sum is fp32 (in another order than oneDNN's, so y agrees with
//   F.linear to about one bf16 rounding, not bit for bit), rounded to nearest even once.
//   linear_small_supported() is false in builds without AVX512_BF16 (torch runs then).
//
// Algorithm: W's rows are split over threads in contiguous ranges (at::parallel_for; one
// thread below kParallelMinBytes of W, where the fork costs more than it saves). A task takes
// kRowsW rows of W at a time (1 by default, see below) and, for tiles of up to 4 rows of x, keeps
// 4 x kRowsW fp32 accumulators: each 32-element chunk of the W rows is loaded once and multiplied into every
// x row with _mm512_dpbf16_ps (pairs of bf16 products summed into 16 fp32 lanes). x rows live
// in L1 (8 x K bf16); with more than 4 rows of x the same W rows are reused from L1 by the
// second tile. K's tail uses masked loads (zeros add nothing). With kPrefetchAhead > 0 each line of W is
// prefetched kPrefetchAhead elements before its load.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOONG_SKINNY_BF16 1
#endif

namespace loong {
namespace {

constexpr int64_t kMaxRows = 8;                      // rows of x this kernel takes
// W rows per inner block. 1: each thread reads its range of W strictly in order, one stream
// the hardware prefetcher follows at full speed. 4 rows at a time (the earlier default) make 4
// short interleaved streams that need software prefetch and, on the 2-core EPYC VM measured in
// Dec 2026, streamed SmolLM2's projections at 13-18 GB/s at one row against 24-25 GB/s with 1
// row (the read bandwidth there: 25-35 GB/s). Tunable: -DLOONG_SKINNY_ROWS_W=N.
#ifndef LOONG_SKINNY_ROWS_W
#define LOONG_SKINNY_ROWS_W 1
#endif
constexpr int64_t kRowsW = LOONG_SKINNY_ROWS_W;      // W rows per inner block
constexpr int64_t kParallelMinBytes = 512 * 1024;    // W smaller than this: one thread
// Software prefetch distance in elements (-1: none, the default with sequential rows; it
// helped the 4-row blocks, 2304 = one 4-row block of K = 576 ahead). -DLOONG_SKINNY_PREFETCH=N.
#ifndef LOONG_SKINNY_PREFETCH
#define LOONG_SKINNY_PREFETCH -1
#endif
constexpr int64_t kPrefetchAhead = LOONG_SKINNY_PREFETCH;

#ifdef LOONG_SKINNY_BF16
using bf16 = c10::BFloat16;

inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bh(const bf16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// y[m][n0 + r] for r < R, m < MT: x rows xs[m] (K elements each), W rows w + (n0 + r) * K.
template <int MT, int R>
inline void block(const bf16* const* xs, const bf16* w, int64_t K, int64_t n0,
                  const bf16* bias, bf16* const* ys) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const bf16* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    if (kPrefetchAhead > 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(wr[r] + kPrefetchAhead + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) wv[r] = load_bh(wr[r] + k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load_bh(xs[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mask = __mmask32((1ull << (K - k)) - 1ull);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_bh(wr[r] + k, mask);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load_bh(xs[m] + k, mask);
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

// Rows [n_lo, n_hi) of W against x rows [m0, m0 + MT).
template <int MT>
void rows_range(const bf16* const* xs, const bf16* w, int64_t K, int64_t n_lo, int64_t n_hi,
                const bf16* bias, bf16* const* ys) {
  int64_t n = n_lo;
  for (; n + kRowsW <= n_hi; n += kRowsW) block<MT, kRowsW>(xs, w, K, n, bias, ys);
  for (; n < n_hi; ++n) block<MT, 1>(xs, w, K, n, bias, ys);
}

void run_rows(const bf16* const* xs, int64_t M, const bf16* w, int64_t K, int64_t n_lo,
              int64_t n_hi, const bf16* bias, bf16* const* ys) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mt = std::min<int64_t>(4, M - m0);
    switch (mt) {
      case 1: rows_range<1>(xs + m0, w, K, n_lo, n_hi, bias, ys + m0); break;
      case 2: rows_range<2>(xs + m0, w, K, n_lo, n_hi, bias, ys + m0); break;
      case 3: rows_range<3>(xs + m0, w, K, n_lo, n_hi, bias, ys + m0); break;
      default: rows_range<4>(xs + m0, w, K, n_lo, n_hi, bias, ys + m0); break;
    }
  }
}
#endif  // LOONG_SKINNY_BF16

}  // namespace

bool linear_small_supported() {
#ifdef LOONG_SKINNY_BF16
  return true;
#else
  return false;
#endif
}

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(linear_small_supported(), "linear_small: this build has no AVX512_BF16 path");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_small: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "linear_small: x and w must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_small: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "linear_small: x has K=", K, ", w has ", w.size(1));
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "linear_small: 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, "linear_small: x's last dim must be contiguous");
  TORCH_CHECK(w.is_contiguous(), "linear_small: w must be contiguous");
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = &bias.value();
    TORCH_CHECK(b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == N &&
                    b->is_contiguous() && b->device().is_cpu(),
                "linear_small: bias must be a contiguous bfloat16 [N]");
  }
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef LOONG_SKINNY_BF16
  if (N == 0) return y;
  const bf16* xs[kMaxRows];
  bf16* ys[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<bf16>() + m * x.stride(0);
    ys[m] = y.data_ptr<bf16>() + m * N;
  }
  const bf16* wp = w.data_ptr<bf16>();
  const bf16* bp = b ? b->data_ptr<bf16>() : nullptr;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) ys[m][n] = bf16(bp ? static_cast<float>(bp[n]) : 0.0f);
    return y;
  }
  const int64_t bytes = N * K * 2;
  if (bytes < kParallelMinBytes || at::get_num_threads() == 1) {
    run_rows(xs, M, wp, K, 0, N, bp, ys);
  } else {
    // One contiguous range per thread, in whole kRowsW blocks.
    const int64_t nthr = at::get_num_threads();
    const int64_t blocks = (N + kRowsW - 1) / kRowsW;
    const int64_t per = (blocks + nthr - 1) / nthr;
    at::parallel_for(0, nthr, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n_lo = std::min(N, t * per * kRowsW);
        const int64_t n_hi = std::min(N, (t + 1) * per * kRowsW);
        if (n_lo < n_hi) run_rows(xs, M, wp, K, n_lo, n_hi, bp, ys);
      }
    });
  }
#endif
  return y;
}

}  // namespace loong
