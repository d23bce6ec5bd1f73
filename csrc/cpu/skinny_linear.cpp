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
// Algorithm (the tiles and the thread split are skinny_tiles.h's, shared with q8_linear.cpp):
// W's rows are split over threads in contiguous ranges (at::parallel_for; one thread below
// kParallelMinBytes of W, where the fork costs more than it saves). A task takes kRowsW rows of
// W at a time (1 by default, see below) and, for tiles of up to 4 rows of x, keeps 4 x kRowsW
// fp32 accumulators: each 32-element chunk of the W rows is loaded once and multiplied into
// every x row with _mm512_dpbf16_ps (pairs of bf16 products summed into 16 fp32 lanes). x rows
// live in L1 (8 x K bf16); with more than 4 rows of x the same W rows are reused from L1 by the
// second tile. K's tail uses masked loads (zeros add nothing). With kPrefetchAhead > 0 each
// line of W is prefetched kPrefetchAhead elements before its load.

#include "skinny_tiles.h"

namespace loong {
namespace {

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

#ifdef LOONG_SKINNY_TILES_BF16
using skinny::bf16;

// W [N, K] bf16, row-major: the skinny_tiles.h `Rows` policy.
struct Bf16Rows {
  const bf16* w;
  int64_t K;
  __m512bh load(int64_t n, int64_t k) const { return skinny::load_bh(w + n * K + k); }
  __m512bh load_tail(int64_t n, int64_t k, __mmask32 m) const {
    return skinny::load_bh(w + n * K + k, m);
  }
  void prefetch(int64_t n, int64_t k) const {
    if (kPrefetchAhead > 0)
      _mm_prefetch(reinterpret_cast<const char*>(w + n * K + k + kPrefetchAhead), _MM_HINT_T0);
  }
};
#endif  // LOONG_SKINNY_TILES_BF16

}  // namespace

bool linear_small_supported() {
#ifdef LOONG_SKINNY_TILES_BF16
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
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "linear_small: x has K=", K, ", w has ", w.size(1));
  TORCH_CHECK(w.is_contiguous(), "linear_small: w must be contiguous");
  const at::Tensor* b = skinny::check_x_and_bias("linear_small", x, N, bias);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
#ifdef LOONG_SKINNY_TILES_BF16
  if (N == 0) return y;
  skinny::linear<kRowsW>(x, Bf16Rows{w.data_ptr<bf16>(), K}, N, N * K * 2, kParallelMinBytes, b,
                         y);
#endif
  return y;
}

}  // namespace loong
