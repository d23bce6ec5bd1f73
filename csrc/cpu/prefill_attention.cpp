// Prefill attention for CPU: causal (square, query i sees keys 0..i) or full (no mask).
//
// Contract (the same as loong.attention.cpu.causal_attention_torch / full_attention_torch):
//   q [Lq, H, D], k/v [Lk, Hkv, D], fp32 or bf16 (all the same), any strides;
//   returns out [Lq, H, D] (q's dtype, contiguous) and lse [Lq, H] fp32, natural log of
//   sum_j exp(scale * q.k_j). Query head h reads kv head h / (H / Hkv) (GQA). Causal needs
//   Lq == Lk. A query with no visible key gets out 0, lse -inf.
//
// Algorithm (flash attention, written as two small GEMMs per tile):
//   * K and V are first packed per (kv head, block of kBK = 64 keys), in parallel, into the
//     layouts the micro-kernels stream: bf16 K as [D/2][kBK][2] (pairs of head-dim elements of
//     one key, the operand order of _mm512_dpbf16_ps), bf16 V as [kBK/2][D][2] (pairs of
//     keys); fp32 K as [D][kBK] and V as [kBK][D]. The tail of the last block is zero.
//   * A task is (kv head, tile of BQ query positions). Its rows are (position, group head)
//     pairs, r = i * G + g, so the G query heads that share a kv head reuse every K / V tile
//     (and a row group is contiguous in q and out). Rows are padded to a multiple of 6.
//   * Per key block (causal: only blocks with a visible key): S = Q K^T with register tiles of
//     6 rows x 64 keys (24 fp32 accumulators; bf16: one dpbf16 per 2 head-dim elements), then
//     the online softmax per row in fp32 (scores kept raw; p = 2^((s - m) * scale * log2 e)
//     with a polynomial 2^x), P stored in the input dtype (bf16 P for the dpbf16 P.V), then
//     O = O * alpha + P V with register tiles of 6 rows x D (D <= 64), 3 x 128 or 1 x 256,
//     accumulating over the block's visible keys only.
//   * Tasks are handed out dynamically (atomic counter) to at::parallel_for's threads, the
//     heaviest (latest) query tiles first.
// Needs AVX-512F (fp32) and AVX512_BF16 (bf16), and D in {32, 64, 128, 256};
// prefill_attention_supported() says whether a call would run, otherwise the caller uses torch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOONG_PF_AVX512 1
#endif

namespace loong {

#ifdef LOONG_PF_AVX512
namespace {

constexpr int kBK = 128;         // keys per block (S is computed in 64-key halves)
constexpr int kNV = kBK / 16;    // zmm vectors per row of a score tile
constexpr int kMR = 6;           // rows per S register tile (and row padding)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using bf16 = c10::BFloat16;

template <typename T>
constexpr int kPair = std::is_same<T, float>::value ? 1 : 2;   // elements per 32-bit operand

// 2^x for x <= ~0 (x below -160, including -inf, gives exactly 0): x = n + f, |f| <= 1/2,
// 2^f by the degree-DEG Taylor polynomial of e^(f ln2) written in f (coefficients ln2^k / k!),
// scaled by 2^n. Relative error on |f| <= 1/2: < 1e-8 for DEG 7 (fp32), < 4e-6 for DEG 5
// (bf16, where p is rounded to 8 significant bits anyway).
template <int DEG>
inline __m512 exp2_ps(__m512 x) {
  static constexpr float kC[8] = {1.0f, 0.6931471805599453f, 0.2402265069591007f,
                                  0.05550410866482158f, 0.009618129107628477f,
                                  0.0013333558146428443f, 0.00015403530393381608f,
                                  1.525273380405984e-05f};
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 r = _mm512_set1_ps(kC[DEG]);
#pragma GCC unroll 8
  for (int i = DEG - 1; i >= 0; --i) r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(kC[i]));
  return _mm512_scalef_ps(r, n);
}

template <typename T>
constexpr int kExpDeg = std::is_same<T, float>::value ? 7 : 5;

// acc += a * b where b is a 32-bit broadcast operand (one fp32, or a pair of bf16).
template <typename T>
inline __m512 madd(__m512 acc, __m512i a, __m512i b) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  } else {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    return acc;   // never instantiated at run time (prefill_attention_supported is false)
#endif
  }
}

inline __m512i bcast32(const void* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return _mm512_set1_epi32(x);
}

// S[kMR rows][64 keys] (fp32, row stride kBK) = Q[kMR rows of D] . the 64 keys of the packed
// block starting at kp (a 64-key half of a block: element stride kBK between operand rows).
template <typename T, int D>
inline void s_tile(const T* q, const T* kp, float* s) {
  constexpr int P = kPair<T>;
  constexpr int NV = 4;
  __m512 acc[kMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int p = 0; p < D / P; ++p) {
    __m512i kv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) kv[v] = _mm512_loadu_si512(kp + (p * kBK + 16 * v) * P);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512i b = bcast32(q + r * D + p * P);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = madd<T>(acc[r][v], kv[v], b);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * kBK + 16 * v, acc[r][v]);
}

// O[MR rows of D] = O * alpha + P[MR rows, kBK] . Vp over the first npairs 32-bit operands
// (key pairs for bf16, keys for fp32).
template <typename T, int D, int MR>
inline void pv_tile(const T* pr, const T* vp, float* o, const float* alpha, int npairs) {
  constexpr int P = kPair<T>;
  constexpr int NVD = D / 16;
  __m512 acc[MR][NVD];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 16
    for (int j = 0; j < NVD; ++j) acc[r][j] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * j), a);
  }
  for (int p = 0; p < npairs; ++p) {
    __m512i vv[NVD];
#pragma GCC unroll 16
    for (int j = 0; j < NVD; ++j) vv[j] = _mm512_loadu_si512(vp + (p * D + 16 * j) * P);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i b = bcast32(pr + r * kBK + p * P);
#pragma GCC unroll 16
      for (int j = 0; j < NVD; ++j) acc[r][j] = madd<T>(acc[r][j], vv[j], b);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NVD; ++j) _mm512_storeu_ps(o + r * D + 16 * j, acc[r][j]);
}

// Store 16 fp32 as the element type.
inline void store16(float* dst, __m512 x) { _mm512_storeu_ps(dst, x); }
inline void store16(bf16* dst, __m512 x) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
#else
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, x);
  for (int i = 0; i < 16; ++i) dst[i] = bf16(tmp[i]);
#endif
}

// A row of kBK probabilities in the element type (bf16: two vectors per conversion).
inline void store_row(float* dst, const __m512* pv) {
#pragma GCC unroll 8
  for (int vi = 0; vi < kNV; ++vi) _mm512_storeu_ps(dst + 16 * vi, pv[vi]);
}
inline void store_row(bf16* dst, const __m512* pv) {
#if defined(__AVX512BF16__)
#pragma GCC unroll 4
  for (int vi = 0; vi < kNV; vi += 2)
    _mm512_storeu_si512(dst + 16 * vi, (__m512i)_mm512_cvtne2ps_pbh(pv[vi + 1], pv[vi]));
#else
#pragma GCC unroll 8
  for (int vi = 0; vi < kNV; ++vi) store16(dst + 16 * vi, pv[vi]);
#endif
}

// Per-thread scratch, 64-byte aligned, grown on demand.
inline char* scratch(size_t bytes) {
  thread_local std::vector<char> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) &
                                 ~uintptr_t(63));
}

inline size_t round64(size_t b) { return (b + 63) & ~size_t(63); }

struct Shape {
  int64_t Lq, Lk, H, Hkv, G;
  int64_t q_s0, q_s1, q_s2;
  int64_t k_s0, k_s1, k_s2;
  int64_t v_s0, v_s1, v_s2;
  bool causal;
  float scale;
};

template <typename T, int D>
void run(const Shape& sh, const T* q, const T* k, const T* v, T* out, float* lse) {
  constexpr int P = kPair<T>;
  constexpr int MR2 = D <= 64 ? 6 : (D == 128 ? 3 : 1);
  static_assert(kMR % MR2 == 0, "row padding must cover the PV tile");
  const int64_t Lq = sh.Lq, Lk = sh.Lk, H = sh.H, Hkv = sh.Hkv, G = sh.G;
  const int64_t nkb = (Lk + kBK - 1) / kBK;
  const int64_t blk = int64_t(kBK) * D;      // elements per packed block

  // ---- pack K and V: [Hkv][nkb][block]
  std::vector<T> kpack(size_t(Hkv * nkb * blk)), vpack(size_t(Hkv * nkb * blk));
  at::parallel_for(0, Hkv * nkb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t kh = t / nkb, kb = t % nkb;
      T* kd = kpack.data() + t * blk;
      T* vd = vpack.data() + t * blk;
      const int64_t n = std::min<int64_t>(kBK, Lk - kb * kBK);
      if (n < kBK) {
        std::fill(kd, kd + blk, T(0));
        std::fill(vd, vd + blk, T(0));
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t key = kb * kBK + j;
        const T* ks = k + key * sh.k_s0 + kh * sh.k_s1;
        const T* vs = v + key * sh.v_s0 + kh * sh.v_s1;
        for (int64_t d = 0; d < D; ++d) {
          kd[((d / P) * kBK + j) * P + d % P] = ks[d * sh.k_s2];
          vd[((j / P) * D + d) * P + j % P] = vs[d * sh.v_s2];
        }
      }
    }
  });

  // ---- query tiles: about 96 rows per tile
  int64_t bq = 64;
  while (bq > 8 && bq * G > 96) bq /= 2;
  const int64_t nqt = (Lq + bq - 1) / bq;
  const int64_t rows_pad = ((bq * G + kMR - 1) / kMR) * kMR;
  const int64_t ntasks = nqt * Hkv;
  const float c = sh.scale * kLog2e;
  const __m512 cv = _mm512_set1_ps(c);

  const size_t bytes = round64(rows_pad * D * sizeof(T)) +       // Q
                       round64(rows_pad * kBK * sizeof(float)) +  // S
                       round64(rows_pad * kBK * sizeof(T)) +      // P
                       round64(rows_pad * D * sizeof(float)) +    // O
                       5 * round64(rows_pad * sizeof(float));     // m, l, alpha, delta, rsum
  std::atomic<int64_t> next(0);
  const int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));

  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    char* base = scratch(bytes);
    T* qb = reinterpret_cast<T*>(base);
    base += round64(rows_pad * D * sizeof(T));
    float* sb = reinterpret_cast<float*>(base);
    base += round64(rows_pad * kBK * sizeof(float));
    T* pb = reinterpret_cast<T*>(base);
    base += round64(rows_pad * kBK * sizeof(T));
    float* ob = reinterpret_cast<float*>(base);
    base += round64(rows_pad * D * sizeof(float));
    float* mrow = reinterpret_cast<float*>(base);
    base += round64(rows_pad * sizeof(float));
    float* lrow = reinterpret_cast<float*>(base);
    base += round64(rows_pad * sizeof(float));
    float* alpha = reinterpret_cast<float*>(base);
    base += round64(rows_pad * sizeof(float));
    float* delta = reinterpret_cast<float*>(base);    // m_old - m_new per row (0: unchanged)
    base += round64(rows_pad * sizeof(float));
    float* rsum = reinterpret_cast<float*>(base);     // this block's sum of p per row

    for (;;) {
      const int64_t t = next.fetch_add(1);
      if (t >= ntasks) break;
      // heaviest first: the last query tile of every kv head, then the one before, ...
      const int64_t qt = sh.causal ? nqt - 1 - t / Hkv : t / Hkv;
      const int64_t kh = t % Hkv;
      const int64_t q0 = qt * bq;
      const int64_t nq = std::min<int64_t>(bq, Lq - q0);
      const int64_t nrows = nq * G;
      const int64_t nrt = (nrows + kMR - 1) / kMR * kMR;   // rows computed

      // gather Q rows (r = i * G + g), zero padding
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const T* src = q + (q0 + i) * sh.q_s0 + (kh * G + g) * sh.q_s1;
          T* dst = qb + (i * G + g) * D;
          if (sh.q_s2 == 1) {
            std::memcpy(dst, src, D * sizeof(T));
          } else {
            for (int64_t d = 0; d < D; ++d) dst[d] = src[d * sh.q_s2];
          }
        }
      std::fill(qb + nrows * D, qb + nrt * D, T(0));
      std::fill(pb + nrows * kBK, pb + nrt * kBK, T(0));
      std::fill(ob, ob + nrt * D, 0.0f);
      std::fill(mrow, mrow + nrt, kNegInf);
      std::fill(lrow, lrow + nrt, 0.0f);
      std::fill(alpha, alpha + nrt, 1.0f);
      std::fill(delta, delta + nrt, 0.0f);
      std::fill(rsum, rsum + nrt, 0.0f);

      // keys visible to the tile's last row
      const int64_t kend_max = sh.causal ? std::min<int64_t>(Lk, q0 + nq) : Lk;
      const int64_t nb = (kend_max + kBK - 1) / kBK;
      const T* kpk = kpack.data() + kh * nkb * blk;
      const T* vpk = vpack.data() + kh * nkb * blk;

      for (int64_t kb = 0; kb < nb; ++kb) {
        const int64_t k0 = kb * kBK;
        const T* kp = kpk + kb * blk;
        const T* vp = vpk + kb * blk;
        // (1) scores, 64-key halves with a visible key only
        const int nhalf = k0 + 64 < kend_max ? 2 : 1;
        // (2) online softmax per real row, right after its row group's scores (still in L1):
        // p = 2^((s - m_new) c); the rescale factors alpha = 2^((m_old - m_new) c) and the
        // running sums are updated 16 rows at a time afterwards
        const int64_t kfull = std::max<int64_t>(0, Lk - k0);   // keys that exist in the block
        for (int64_t r0 = 0; r0 < nrt; r0 += kMR) {
         for (int hf = 0; hf < nhalf; ++hf)
           s_tile<T, D>(qb + r0 * D, kp + 64 * hf * P, sb + r0 * kBK + 64 * hf);
         const int64_t r1 = std::min<int64_t>(r0 + kMR, nrows);
         for (int64_t r = r0; r < r1; ++r) {
          const int64_t kend = sh.causal ? std::min<int64_t>(Lk, q0 + r / G + 1) : Lk;
          const int64_t nvis = std::min<int64_t>(kend - k0, kfull);
          T* prow = pb + r * kBK;
          if (nvis <= 0) {     // nothing visible in this block (cannot happen for bq | kBK)
            std::fill(prow, prow + kBK, T(0));
            delta[r] = 0.0f;
            rsum[r] = 0.0f;
            continue;
          }
          const float* srow = sb + r * kBK;
          __m512 s[kNV];
          __m512 mx;
          if (nvis >= kBK) {
#pragma GCC unroll 8
            for (int vi = 0; vi < kNV; ++vi) s[vi] = _mm512_loadu_ps(srow + 16 * vi);
          } else {
#pragma GCC unroll 8
            for (int vi = 0; vi < kNV; ++vi) {
              const int64_t cnt = std::max<int64_t>(0, std::min<int64_t>(16, nvis - 16 * vi));
              const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1u);
              s[vi] = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), m, srow + 16 * vi);
            }
          }
          mx = s[0];
#pragma GCC unroll 8
          for (int vi = 1; vi < kNV; ++vi) mx = _mm512_max_ps(mx, s[vi]);
          const float bmax = _mm512_reduce_max_ps(mx);
          const float mold = mrow[r];
          const float mnew = std::max(mold, bmax);
          delta[r] = mold == kNegInf ? kNegInf : mold - mnew;
          mrow[r] = mnew;
          const __m512 mc = _mm512_set1_ps(mnew * c);
          __m512 sum = _mm512_setzero_ps();
          __m512 pv[kNV];
#pragma GCC unroll 8
          for (int vi = 0; vi < kNV; ++vi) {
            pv[vi] = exp2_ps<kExpDeg<T>>(_mm512_fmsub_ps(s[vi], cv, mc));   // masked: 0
            sum = _mm512_add_ps(sum, pv[vi]);
          }
          store_row(prow, pv);
          rsum[r] = _mm512_reduce_add_ps(sum);
         }
        }
        for (int64_t r = 0; r < nrt; r += 16) {
          const __mmask16 m = nrt - r >= 16 ? __mmask16(0xFFFF)
                                            : __mmask16((1u << (nrt - r)) - 1u);
          const __m512 a = exp2_ps<7>(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, delta + r), cv));
          const __m512 l = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, lrow + r), a,
                                           _mm512_maskz_loadu_ps(m, rsum + r));
          _mm512_mask_storeu_ps(alpha + r, m, a);
          _mm512_mask_storeu_ps(lrow + r, m, l);
        }
        // (3) O = O * alpha + P V over the visible keys of the block
        const int64_t nk = std::min<int64_t>(kBK, kend_max - k0);
        const int npairs = int((nk + P - 1) / P);
        for (int64_t r = 0; r < nrt; r += MR2)
          pv_tile<T, D, MR2>(pb + r * kBK, vp, ob + r * D, alpha + r, npairs);
      }

      // (4) out = O / l, lse = m * scale + ln l
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g;
          const int64_t h = kh * G + g;
          T* o = out + ((q0 + i) * H + h) * D;
          const float l = lrow[r];
          const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
#pragma GCC unroll 16
          for (int j = 0; j < D / 16; ++j)
            store16(o + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(ob + r * D + 16 * j), inv));
          lse[(q0 + i) * H + h] = l > 0.0f ? mrow[r] * sh.scale + std::log(l) : kNegInf;
        }
    }
  });
}

template <typename T>
void dispatch(const Shape& sh, int64_t D, const T* q, const T* k, const T* v, T* out,
              float* lse) {
  switch (D) {
    case 32: return run<T, 32>(sh, q, k, v, out, lse);
    case 64: return run<T, 64>(sh, q, k, v, out, lse);
    case 128: return run<T, 128>(sh, q, k, v, out, lse);
    case 256: return run<T, 256>(sh, q, k, v, out, lse);
    default: TORCH_CHECK(false, "prefill_attention: unsupported head size ", D);
  }
}

}  // namespace
#endif  // LOONG_PF_AVX512

bool prefill_attention_supported(bool is_bf16, int64_t head_dim) {
#ifdef LOONG_PF_AVX512
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256) return false;
#if defined(__AVX512BF16__)
  return true;
#else
  return !is_bf16;
#endif
#else
  (void)is_bf16;
  (void)head_dim;
  return false;
#endif
}

std::vector<at::Tensor> prefill_attention(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "prefill_attention: q, k, v must be [L, heads, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(2),
              "prefill_attention: k / v do not match q");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "prefill_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "prefill_attention: q, k, v must share a dtype");
  const int64_t Lq = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Lk = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "prefill_attention: H must be a multiple of Hkv");
  TORCH_CHECK(!causal || Lq == Lk, "prefill_attention: causal needs Lq == Lk");
  const bool is_bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(is_bf16 || q.scalar_type() == at::kFloat,
              "prefill_attention: float32 or bfloat16 only");
  TORCH_CHECK(prefill_attention_supported(is_bf16, D),
              "prefill_attention: not supported by this build for this dtype / head size");
  auto out = at::zeros({Lq, H, D}, q.options());
  auto lse = at::full({Lq, H}, -std::numeric_limits<float>::infinity(),
                      q.options().dtype(at::kFloat));
#ifdef LOONG_PF_AVX512
  if (Lq == 0 || Lk == 0) return {out, lse};
  Shape sh{Lq, Lk, H, Hkv, H / Hkv,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           causal, float(scale)};
  if (is_bf16) {
    dispatch<bf16>(sh, D, q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
                   v.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                   lse.data_ptr<float>());
  } else {
    dispatch<float>(sh, D, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                    out.data_ptr<float>(), lse.data_ptr<float>());
  }
#endif
  return {out, lse};
}

}  // namespace loong
