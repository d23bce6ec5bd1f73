// The one summing order of the skinny linear kernels (skinny_linear.cpp: bf16 W; q8_linear.cpp:
// Q8_0 W decoded to bf16 in registers), and their split of W's rows over threads.
//
// y[m, n] = bf16(sum over 32-element chunks c of K, in order, of _mm512_dpbf16_ps products of
// x[m, c] and W[n, c] into one 16-lane fp32 accumulator, then _mm512_reduce_add_ps, then
// + float(bias[n])), rounded once. Because both kernels run these templates, a Q8_0 weight
// gives bit for bit the result of the bf16 kernel on its decoded values: the only difference
// is how a 32-element chunk of W is loaded (the `Rows` policy below).
//
// A `Rows` policy has
//   __m512bh load(int64_t n, int64_t k) const                  W[n, k..k+32) as bf16
//   __m512bh load_tail(int64_t n, int64_t k, __mmask32 m) const  the same, lanes outside m zero
//   void prefetch(int64_t n, int64_t k) const                  a hint before load (may be empty)
// Tiles: for up to 4 rows of x and kRowsW rows of W at a time (template arguments MT and R),
// each chunk of the R W rows is loaded once and multiplied into every x row of the tile; x
// rows live in L1. Threads: one contiguous range of whole R-row blocks per thread, so each
// thread reads W as one sequential stream (see skinny_linear.cpp for why one row at a time).
//
// The templates exist only where LOONG_SKINNY_TILES_BF16 is defined (below: the build has
// AVX512_BF16); the constants and the argument checks exist in every build, so an including
// file guards its kernel code with that macro and reports "unsupported" otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOONG_SKINNY_TILES_BF16 1
#endif

namespace loong {
namespace skinny {

constexpr int64_t kMaxRows = 8;   // rows of x the skinny kernels take
constexpr int64_t kTileRows = 4;  // rows of x per accumulator tile

// Checks shared by the skinny kernels: x [M, K] bf16 with a contiguous last dim and
// 1 <= M <= kMaxRows; bias None or a contiguous bf16 [N]. Returns the bias or nullptr.
inline const at::Tensor* check_x_and_bias(const char* name, const at::Tensor& x, int64_t N,
                                          const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, name, ": 1 to ", kMaxRows, " rows, got ", M);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, name, ": x's last dim must be contiguous");
  if (!bias.has_value() || !bias->defined()) return nullptr;
  const at::Tensor* b = &bias.value();
  TORCH_CHECK(b->scalar_type() == at::kBFloat16 && b->dim() == 1 && b->size(0) == N &&
                  b->is_contiguous() && b->device().is_cpu(),
              name, ": bias must be a contiguous bfloat16 [N]");
  return b;
}

#ifdef LOONG_SKINNY_TILES_BF16
using bf16 = c10::BFloat16;

inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bh(const bf16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// y[m][n0 + r] for r < R, m < MT: x rows xs[m] (K elements each), W rows n0 .. n0 + R.
template <int MT, int R, class Rows>
inline void tile(const bf16* const* xs, const Rows& w, int64_t K, int64_t n0, const bf16* bias,
                 bf16* const* ys) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) w.prefetch(n0 + r, k);
    for (int r = 0; r < R; ++r) wv[r] = w.load(n0 + r, k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = load_bh(xs[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {   // masked tail: lanes past K are zero in both operands and add nothing
    const __mmask32 mask = __mmask32((1ull << (K - k)) - 1ull);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = w.load_tail(n0 + r, k, mask);
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

// W rows [n0, n0 + R) against all M rows of x, in tiles of up to kTileRows x rows: the R rows
// of W are read from memory by the first tile and from L1 by the others.
template <int R, class Rows>
inline void tiles_at(const bf16* const* xs, int64_t M, const Rows& w, int64_t K, int64_t n0,
                     const bf16* bias, bf16* const* ys) {
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    switch (std::min<int64_t>(kTileRows, M - m0)) {
      case 1: tile<1, R>(xs + m0, w, K, n0, bias, ys + m0); break;
      case 2: tile<2, R>(xs + m0, w, K, n0, bias, ys + m0); break;
      case 3: tile<3, R>(xs + m0, w, K, n0, bias, ys + m0); break;
      default: tile<4, R>(xs + m0, w, K, n0, bias, ys + m0); break;
    }
  }
}

// Rows [n_lo, n_hi) of W against all M rows of x, R W rows at a time (W streamed once).
template <int R, class Rows>
void run_rows(const bf16* const* xs, int64_t M, const Rows& w, int64_t K, int64_t n_lo,
              int64_t n_hi, const bf16* bias, bf16* const* ys) {
  int64_t n = n_lo;
  for (; n + R <= n_hi; n += R) tiles_at<R>(xs, M, w, K, n, bias, ys);
  for (; n < n_hi; ++n) tiles_at<1>(xs, M, w, K, n, bias, ys);
}

// y [M, N] = x [M, K] W^T (+ bias): one thread when W's bytes are below parallel_min_bytes (a
// fork costs more than it saves), else one contiguous range of whole R-row blocks per thread.
template <int R, class Rows>
void linear(const at::Tensor& x, const Rows& w, int64_t N, int64_t w_bytes,
            int64_t parallel_min_bytes, const at::Tensor* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  const bf16* xs[kMaxRows];
  bf16* ys[kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<bf16>() + m * x.stride(0);
    ys[m] = y.data_ptr<bf16>() + m * N;
  }
  const bf16* bp = bias ? bias->data_ptr<bf16>() : nullptr;
  if (w_bytes < parallel_min_bytes || at::get_num_threads() == 1) {
    run_rows<R>(xs, M, w, K, 0, N, bp, ys);
    return;
  }
  const int64_t nthr = at::get_num_threads();
  const int64_t blocks = (N + R - 1) / R;
  const int64_t per = (blocks + nthr - 1) / nthr;
  at::parallel_for(0, nthr, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n_lo = std::min(N, t * per * R);
      const int64_t n_hi = std::min(N, (t + 1) * per * R);
      if (n_lo < n_hi) run_rows<R>(xs, M, w, K, n_lo, n_hi, bp, ys);
    }
  });
}
#endif  // LOONG_SKINNY_TILES_BF16

}  // namespace skinny
}  // namespace loong
