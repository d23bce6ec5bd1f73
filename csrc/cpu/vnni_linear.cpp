// Batched bf16 linear on a weight packed once in pairs of K (the layout _mm512_dpbf16_ps takes):
// y = x W^T (+ b) for the 9 and more rows of a batched decode step or a prefill.
//
// Why: at 9-64 rows SmolLM2's projections are short GEMMs (K = 576 or 1536) whose weights come
// from DRAM on every step. oneDNN's packed GEMM reached 250-330 GFLOP/s there on the Dec 2026
// 2-core EPYC VM (the square bf16 GEMM limit: ~420); this kernel keeps 24 fp32 accumulators in
// registers per 8 x 48 tile of y and prefetches the next panel of W while it computes on the
// current one: 350-410 GFLOP/s over a whole decode step of 32-64 rows, about oneDNN's at
// 256-2048 rows (experiments/decode_latency.py, section batched, measures it in a model).
//
// Packed layout (vnni_pack): W [N, K] -> P, a flat bf16 tensor [NB * K2 * 32] where
// NB = ceil(N / 16) blocks of 16 output columns and K2 = ceil(K / 2) pairs of K; zero padded.
// Blocks are grouped in panels of kPanel (the last panel may hold fewer, nr); panel q starts
// at block b0 = q * kPanel, offset b0 * K2 * 32, and holds, for each pair p in order, its nr
// blocks' 16 columns x 2 elements: P[b0 * K2 * 32 + (p * nr + j) * 32 + c * 2 + e] =
// W[(b0 + j) * 16 + c, 2 p + e]. So each thread reads its panels as one sequential stream.
//
// Contract:
//   vnni_pack(w [N, K] bf16 contiguous) -> P (the layout above); vnni_packed_numel(N, K).
//   linear_vnni(x [M, K] bf16, last dim contiguous, P, N, bias [N] bf16 or None) -> y [M, N]
//   y[m, n] = bf16(sum over pairs p in order of the pair products x[m, 2p] w[n, 2p] +
//   x[m, 2p+1] w[n, 2p+1] into one fp32 lane, + float(bias[n])), rounded to nearest even once.
//   Products of two bf16 are exact in fp32; the sum runs in another order than oneDNN's, so y
//   agrees with F.linear to about one bf16 rounding (bitwise where every partial sum is exact).
//   Odd K: the last pair multiplies x[m, K-1] and a zero (x is never read past its row).
//   linear_vnni_supported() is false in builds without AVX512_BF16 (torch runs then).
//
// Algorithm: threads take contiguous ranges of panels (at::parallel_for); a panel meets x in
// tiles of kTileRows rows (the remainder in one smaller tile), each tile's K loop broadcasting
// one 32-bit pair of x per row and loading nr 32-element vectors of the panel per pair. x is
// taken in blocks of rows that fit L2 beside a panel, so W is re-read once per block (large M
// only). While a panel's full tiles compute, they prefetch the next panel of the thread's range
// into L2 (each of the T full tiles every T-th pair, so the reads spread over the panel's time).

#include "skinny_tiles.h"

#include <cstring>

namespace loong {
namespace {

constexpr int64_t kBlock = 16;     // output columns per block (one zmm of fp32)
constexpr int kPanel = 3;          // blocks per panel: 3 x kTileRows = 24 accumulators
constexpr int kTileRows = 8;       // rows of x per tile
constexpr int64_t kXBlockBytes = 384 * 1024;   // x rows per pass: about this many bytes

#ifdef LOONG_SKINNY_TILES_BF16
using skinny::bf16;

// y rows [0, MR) x the panel's NR blocks (columns n0 ..): the whole K loop, then bias and store.
// pf: the next panel to prefetch (or nullptr): its lines of pair p when p % pf_every == pf_phase.
template <int MR, int NR>
inline void tile(const bf16* x, int64_t ldx, const bf16* wp, int64_t K2, int64_t pairs_full,
                 const bf16* bias, bf16* y, int64_t ldy, int64_t n0, int64_t N, const bf16* pf,
                 int pf_phase, int pf_every) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int phase = pf_phase;
  for (int64_t p = 0; p < pairs_full; ++p) {
    if (pf != nullptr && phase == 0)
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf + (p * NR + j) * 32), _MM_HINT_T1);
    if (++phase == pf_every) phase = 0;
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j) b[j] = skinny::load_bh(wp + (p * NR + j) * 32);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  if (pairs_full < K2) {   // odd K: x's last element with a zero beside it
    const int64_t p = pairs_full;
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j) b[j] = skinny::load_bh(wp + (p * NR + j) * 32);
    for (int i = 0; i < MR; ++i) {
      uint16_t last;
      std::memcpy(&last, x + i * ldx + 2 * p, sizeof(last));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int32_t(last));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j * kBlock;
    if (n >= N) break;
    const int64_t left = std::min<int64_t>(kBlock, N - n);
    const __mmask16 mask = left == kBlock ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    __m512 bv = _mm512_setzero_ps();
    if (bias != nullptr) {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, bias + n);
      bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 v = bias != nullptr ? _mm512_add_ps(acc[i][j], bv) : acc[i][j];
      _mm256_mask_storeu_epi16(y + i * ldy + n, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// All M rows of x against one panel of NR blocks; `next` is the panel to prefetch or nullptr.
template <int NR>
void panel(const bf16* x, int64_t ldx, int64_t M, const bf16* wp, int64_t K2, int64_t pairs_full,
           const bf16* bias, bf16* y, int64_t N, int64_t n0, const bf16* next) {
  const int full = int(M / kTileRows);
  int64_t m = 0;
  for (int t = 0; t < full; ++t, m += kTileRows)
    tile<kTileRows, NR>(x + m * ldx, ldx, wp, K2, pairs_full, bias, y + m * N, N, n0, N, next,
                        t, full);
  // The remainder tile prefetches only when it is the panel's only tile.
  const bf16* pf = full == 0 ? next : nullptr;
  const bf16* xm = x + m * ldx;
  bf16* ym = y + m * N;
  switch (M - m) {
    case 0: break;
    case 1: tile<1, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    case 2: tile<2, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    case 3: tile<3, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    case 4: tile<4, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    case 5: tile<5, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    case 6: tile<6, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
    default: tile<7, NR>(xm, ldx, wp, K2, pairs_full, bias, ym, N, n0, N, pf, 0, 1); break;
  }
}
#endif  // LOONG_SKINNY_TILES_BF16

}  // namespace

bool linear_vnni_supported() {
#ifdef LOONG_SKINNY_TILES_BF16
  return true;
#else
  return false;
#endif
}

int64_t vnni_packed_numel(int64_t N, int64_t K) {
  return (N + kBlock - 1) / kBlock * ((K + 1) / 2) * 32;
}

at::Tensor vnni_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.device().is_cpu(),
              "vnni_pack: w must be a contiguous CPU bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t NB = (N + kBlock - 1) / kBlock, K2 = (K + 1) / 2;
  at::Tensor out = at::zeros({vnni_packed_numel(N, K)}, w.options());
  const c10::BFloat16* src = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t b = n / kBlock, c = n % kBlock;
      const int64_t b0 = b / kPanel * kPanel, nr = std::min<int64_t>(kPanel, NB - b0);
      c10::BFloat16* base = dst + b0 * K2 * 32 + (b - b0) * 32 + c * 2;
      for (int64_t k = 0; k < K; ++k) base[(k / 2) * nr * 32 + (k & 1)] = src[n * K + k];
    }
  });
  return out;
}

at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(linear_vnni_supported(), "linear_vnni: this build has no AVX512_BF16 path");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "linear_vnni: x must be a CPU bfloat16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, "linear_vnni: x's last dim must be contiguous");
  TORCH_CHECK(N >= 0 && packed.dim() == 1 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.numel() == vnni_packed_numel(N, K),
              "linear_vnni: packed must be vnni_pack of a bfloat16 [", N, ", ", K, "] weight");
  const c10::BFloat16* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                "linear_vnni: bias must be a contiguous bfloat16 [N]");
    b = bias->data_ptr<c10::BFloat16>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef LOONG_SKINNY_TILES_BF16
  if (M == 0 || N == 0) return y;
  const int64_t NB = (N + kBlock - 1) / kBlock, K2 = (K + 1) / 2, pairs_full = K / 2;
  const int64_t panels = (NB + kPanel - 1) / kPanel;
  const int64_t ldx = x.stride(0);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = packed.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  // Rows of x per pass: a block of x stays in L2 while every panel meets it.
  const int64_t fit = std::min<int64_t>(256, kXBlockBytes / std::max<int64_t>(1, K * 2));
  const int64_t rows = std::max<int64_t>(kTileRows, fit / kTileRows * kTileRows);
  for (int64_t m0 = 0; m0 < M; m0 += rows) {
    const int64_t mm = std::min(rows, M - m0);
    const bf16* xb = xp + m0 * ldx;
    bf16* yb = yp + m0 * N;
    at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t b0 = q * kPanel, nr = std::min<int64_t>(kPanel, NB - b0);
        const bf16* pw = wp + b0 * K2 * 32;
        const bf16* next = q + 1 < hi ? pw + nr * K2 * 32 : nullptr;
        const int64_t n0 = b0 * kBlock;
        if (nr == 3) panel<3>(xb, ldx, mm, pw, K2, pairs_full, b, yb, N, n0, next);
        else if (nr == 2) panel<2>(xb, ldx, mm, pw, K2, pairs_full, b, yb, N, n0, next);
        else panel<1>(xb, ldx, mm, pw, K2, pairs_full, b, yb, N, n0, next);
      }
    });
  }
#endif
  return y;
}

}  // namespace loong
