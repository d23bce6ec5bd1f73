// Paged decode attention for CPU: one query token per row against its paged KV cache.
//
// Contract (the same as loong.attention.cpu.paged_decode_attention_torch):
//   q            [B, H, D]                      fp32 or bf16, any strides
//   k_cache      [num_blocks, block_size, Hkv, D] same dtype as q, contiguous
//   v_cache      like k_cache
//   block_tables int32 [B, max_blocks], contiguous
//   context_lens int32 [B]; a length <= 0 gives out 0, lse -inf
//   returns out [B, H, D] (q's dtype) and lse [B, H] fp32, natural log of sum(exp(scale*q.k)).
//   Query head h reads kv head h / (H / Hkv) (GQA).
//
// Work is split into tasks of (row, token range): a row longer than the chunk size (about
// 1/4 of the batch's tokens per thread, at least 256) is split into several tasks (split-K),
// whose partial results are merged through log-sum-exp at the end. Tasks are handed out
// longest first, dynamically (an atomic counter), to at::parallel_for's threads.
//
// A task walks its range in tiles of 16 token positions; a tile's KV rows are addressed through
// the block table (any block size works and nothing is gathered). Per tile, for all H heads:
//   (A) the 16 scores of each query head: one dot product per (token, head) as 16 partial
//       sums, reduced 16 at a time by a transpose-add tree. Every loaded K row serves the G
//       query heads of its kv head from L1;
//   (B) the online-softmax update (fp32, log2 domain; the running max broadcast in all lanes,
//       the running sum per lane), head after head so the H dependency chains overlap;
//   (C) acc = acc * alpha + sum_i w_i V_i in fp32 for blocks of heads, so each V row is loaded
//       and widened once per block.
// While (A) runs, the rows of the tile two ahead are prefetched into L2 (see kPrefetchTiles).
//
// SIMD: AVX-512F/BW code for head sizes 32/64/128/256. With AVX512_BF16, bf16 caches use
// _mm512_dpbf16_ps for q.k (bf16 x bf16 products are exact in fp32) and for P.V: two V rows
// interleaved by _mm512_unpack{lo,hi}_epi16 times the pair of weights rounded to bf16 (the sum
// and max stay fp32). Without it bf16 is widened by shift / mask, which yields the even and
// odd elements of a 32-element chunk as two fp32 vectors. Either way the fp32 accumulators hold
// the head dimension in a permuted order (Layout), undone when the output is written. Without
// AVX-512, or for other head sizes, a plain scalar implementation runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOONG_AVX512 1
#endif

namespace loong {
namespace {

constexpr int kTile = 16;                 // token positions per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Task {
  int64_t row;
  int64_t start;   // first token position
  int64_t end;     // one past the last
  int64_t part;    // index into the partial buffers, or -1: write the final result directly
};

// Everything a task needs, shared read-only by all tasks of one call.
template <typename T>
struct Problem {
  const T* q;
  int64_t q_s0, q_s1, q_s2;
  const T* k;
  const T* v;
  const int32_t* tables;
  int64_t max_blocks;
  int64_t block_size;
  int64_t H, Hkv, G, D;
  float scale_log2;            // scale * log2(e): scores are kept in the log2 domain
  int layout;                  // order of the fp32 accumulators (see natural_index)
  const int32_t* perm;         // [D]: natural position of accumulator index i
  T* out;                      // [B, H, D]
  float* lse;                  // [B, H]
  float* part_acc;             // [parts, H, D]
  float* part_m;               // [parts, H]
  float* part_l;               // [parts, H]

  // Element offset of token `pos` of `row` (head 0) in the caches.
  inline int64_t token_offset(int64_t row, int64_t pos) const {
    const int64_t blk = tables[row * max_blocks + pos / block_size];
    return (blk * block_size + pos % block_size) * Hkv * D;
  }
};

// Accumulator layouts. kNatural: element d at index d. Within each 32-element chunk,
// kEvenOdd: the 16 even elements, then the 16 odd ones (bf16 widened by shift / mask);
// kPairs: the order _mm512_unpack{lo,hi}_epi16 of two V rows leaves for _mm512_dpbf16_ps:
// first, for each 128-bit lane L, elements 8L..8L+3, then elements 8L+4..8L+7.
enum Layout { kNatural = 0, kEvenOdd = 1, kPairs = 2 };

// Position in natural order of the element stored at accumulator index i.
inline int64_t natural_index(int64_t i, int layout) {
  const int64_t c = i & ~int64_t(31), r = i & 31;
  switch (layout) {
    case kEvenOdd: return r < 16 ? c + 2 * r : c + 2 * (r - 16) + 1;
    case kPairs: return r < 16 ? c + 8 * (r / 4) + r % 4 : c + 8 * ((r - 16) / 4) + 4 + r % 4;
    default: return i;
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Writes one (row, head) result: out = acc / l (undoing the accumulator order), lse natural log.
template <typename T>
void write_final(const Problem<T>& p, int64_t row, int64_t h, const float* acc, float m2,
                 float l) {
  T* o = p.out + (row * p.H + h) * p.D;
  const float inv = 1.0f / l;
  for (int64_t i = 0; i < p.D; ++i) o[p.perm[i]] = T(acc[i] * inv);
  p.lse[row * p.H + h] = m2 * kLn2 + std::log(l);
}

// Hands the per-head state of a finished task to its destination.
template <typename T>
void finish_task(const Problem<T>& p, const Task& t, const float* acc, const float* m2,
                 const float* l) {
  if (t.part < 0) {
    for (int64_t h = 0; h < p.H; ++h) write_final(p, t.row, h, acc + h * p.D, m2[h], l[h]);
  } else {
    std::copy(acc, acc + p.H * p.D, p.part_acc + t.part * p.H * p.D);
    std::copy(m2, m2 + p.H, p.part_m + t.part * p.H);
    std::copy(l, l + p.H, p.part_l + t.part * p.H);
  }
}

// Per-thread scratch memory handed out in 64-byte aligned pieces, sized up front (`bytes`, the
// sum of Arena::size of the pieces) so that pieces never move; reused by every task a thread
// runs, so small tasks do not pay for allocations.
class Arena {
 public:
  template <typename U>
  static size_t size(int64_t n) { return (size_t(n) * sizeof(U) + 63) & ~size_t(63); }

  explicit Arena(size_t bytes) : used_(0), cap_(bytes) {
    thread_local std::vector<char> buf;
    if (buf.size() < bytes + 64) buf.resize(bytes + 64);
    base_ = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) &
                                    ~uintptr_t(63));
  }
  template <typename U>
  U* take(int64_t n) {
    const size_t bytes = size<U>(n);
    TORCH_CHECK(used_ + bytes <= cap_, "Arena: piece larger than reserved");
    U* out = reinterpret_cast<U*>(base_ + used_);
    used_ += bytes;
    return out;
  }

 private:
  char* base_;
  size_t used_, cap_;
};

// ------------------------------------------------------------------ scalar implementation
template <typename T>
void run_task_scalar(const Problem<T>& p, const Task& t) {
  const int64_t H = p.H, D = p.D, G = p.G;
  std::vector<float> qf(H * D), acc(H * D, 0.0f), m2(H, kNegInf), l(H, 0.0f);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d)
      qf[h * D + d] = to_float(p.q[t.row * p.q_s0 + h * p.q_s1 + d * p.q_s2]);
  for (int64_t pos = t.start; pos < t.end; ++pos) {
    const int64_t off = p.token_offset(t.row, pos);
    for (int64_t h = 0; h < H; ++h) {
      const T* kr = p.k + off + (h / G) * D;
      const T* vr = p.v + off + (h / G) * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qf[h * D + d] * to_float(kr[d]);
      s *= p.scale_log2;
      const float mn = std::max(m2[h], s);
      const float alpha = std::exp2(m2[h] - mn);   // exp2(-inf) = 0 on the first token
      const float w = std::exp2(s - mn);
      l[h] = l[h] * alpha + w;
      m2[h] = mn;
      float* a = acc.data() + h * D;
      for (int64_t d = 0; d < D; ++d) a[d] = a[d] * alpha + w * to_float(vr[d]);
    }
  }
  finish_task(p, t, acc.data(), m2.data(), l.data());
}

#ifdef LOONG_AVX512
// ------------------------------------------------------------------ AVX-512 helpers
// 2^x for x <= 0 (inputs below -150, including -inf, give 0): x = n + f with |f| <= 1/2,
// 2^f = e^(f ln 2) by its degree-7 Taylor polynomial (relative error < 1e-8 on that range),
// then scaled by 2^n.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(kLn2));
  __m512 r = _mm512_set1_ps(1.0f / 5040.0f);
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f / 720.0f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f / 120.0f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f / 24.0f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f / 6.0f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(0.5f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f));
  r = _mm512_fmadd_ps(r, y, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(r, n);
}

// Lane i of the result is the sum of the 16 lanes of v[i] (v is clobbered). Transpose-add
// tree: two levels of in-lane shuffles (each 128-bit lane ends up holding 4 partial sums of 4
// inputs), then two levels across 128-bit lanes.
inline __m512 reduce_add_16x16(__m512* v) {
  __m512 t[8], x[4], y[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)      // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)      // per 128-bit lane: [v4j, v4j+1, v4j+2, v4j+3] lane sums
    x[j] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * j], t[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * j], t[2 * j + 1], 0xEE));
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j)      // [x0 L0+L1, x0 L2+L3, x1 L0+L1, x1 L2+L3]
    y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                       _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

inline __m512 bf16_even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 bf16_odd(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
}

// Dot products of one K row with one query, as 16 partial sums. NC = D / 16.
// fp32: q natural order. bf16: q as raw bf16 (dpbf16) or deinterleaved fp32 (no BF16 ext).
template <int NC>
inline __m512 dot_row(const float* k, const float* q) {
  __m512 a = _mm512_mul_ps(_mm512_loadu_ps(k), _mm512_loadu_ps(q));
#pragma GCC unroll 16
  for (int c = 1; c < NC; ++c)
    a = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), _mm512_loadu_ps(q + 16 * c), a);
  return a;
}

template <int NC>
inline __m512 dot_row(const c10::BFloat16* k, const float* q) {
#if defined(__AVX512BF16__)
  // q points at raw bf16 pairs stored in a float buffer (see prepare_query).
  __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int c = 0; c < NC / 2; ++c)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(k + 32 * c),
                         (__m512bh)_mm512_loadu_si512(q + 16 * c));
  return a;
#else
  __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int c = 0; c < NC / 2; ++c) {
    const __m512i x = _mm512_loadu_si512(k + 32 * c);
    a = _mm512_fmadd_ps(bf16_even(x), _mm512_loadu_ps(q + 32 * c), a);
    a = _mm512_fmadd_ps(bf16_odd(x), _mm512_loadu_ps(q + 32 * c + 16), a);
  }
  return a;
#endif
}

// Query of head h into the layout dot_row expects (qbuf holds D floats per head).
template <typename T>
void prepare_query(const Problem<T>& p, int64_t row, float* qbuf) {
  for (int64_t h = 0; h < p.H; ++h) {
    const T* src = p.q + row * p.q_s0 + h * p.q_s1;
    float* dst = qbuf + h * p.D;
    if constexpr (std::is_same<T, float>::value) {
      for (int64_t d = 0; d < p.D; ++d) dst[d] = src[d * p.q_s2];
    } else {
#if defined(__AVX512BF16__)
      auto* raw = reinterpret_cast<c10::BFloat16*>(dst);      // first D/2 floats hold D bf16
      for (int64_t d = 0; d < p.D; ++d) raw[d] = src[d * p.q_s2];
#else
      for (int64_t d = 0; d < p.D; ++d) dst[d] = static_cast<float>(src[natural_index(d, kEvenOdd)
                                                                       * p.q_s2]);
#endif
    }
  }
}


// Software prefetch, kPrefetchTiles tiles ahead, into L2 (T1). The hardware prefetchers do
// little for blocks scattered through the cache: without this a core reads them at about half
// the speed it streams. The prefetches are spread evenly over the score computation, one
// (token, kv head) row segment at a time; issued in one burst, or into L1 (T0), they stall the
// core instead, and issued only during the PV phase they overlap less (measured on the dev
// host, B=64 x 2048 bf16, 2 threads: 22 GB/s spread over the scores, 18 in the PV phase, 14
// with T0; distances 1..4 are within noise).
constexpr int kPrefetchTiles = 2;

template <int kBytes>
inline void prefetch_l2(const void* k, const void* v) {
  const char* kp = static_cast<const char*>(k);
  const char* vp = static_cast<const char*>(v);
#pragma GCC unroll 8
  for (int x = 0; x < kBytes; x += 64) {
    _mm_prefetch(kp + x, _MM_HINT_T1);
    _mm_prefetch(vp + x, _MM_HINT_T1);
  }
}

// Maximum over the 16 lanes, broadcast to all lanes.
inline __m512 max_all(__m512 x) {
  x = _mm512_max_ps(x, _mm512_permute_ps(x, 0xB1));
  x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4E));
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
}

// V row i of the tile as NC fp32 vectors in accumulator order.
template <int NC>
inline void load_v(const float* v, __m512* out) {
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) out[c] = _mm512_loadu_ps(v + 16 * c);
}
template <int NC>
inline void load_v(const c10::BFloat16* v, __m512* out) {
#pragma GCC unroll 8
  for (int c = 0; c < NC / 2; ++c) {
    const __m512i x = _mm512_loadu_si512(v + 32 * c);
    out[2 * c] = bf16_even(x);
    out[2 * c + 1] = bf16_odd(x);
  }
}

// Per task: for each tile of 16 positions and each kv head, (A) the 16 scores of every query
// head of the group, (B) the online-softmax update of each head, all in vector registers (the
// running max is kept broadcast in all lanes and the running sum per lane, summed at the end),
// (C) acc = acc * alpha + sum_i w_i V_i for up to kGB heads at a time, so each V row is loaded
// and widened once per head block and the accumulator chains are independent.
template <typename T, int NC>
void run_task_avx512(const Problem<T>& p, const Task& t) {
  constexpr int D = NC * 16;
  constexpr int kRowBytes = D * int(sizeof(T));
  constexpr int kGB = NC >= 16 ? 1 : 16 / NC;      // heads per PV block (<= 16 accumulators)
  constexpr bool kBf16 = !std::is_same<T, float>::value;
  const int64_t H = p.H, Hkv = p.Hkv, G = p.G;
  // Per-task state in a per-thread arena (tasks can be tiny: no allocation per task).
  Arena arena(3 * Arena::size<__m512>(H) + 2 * Arena::size<float>(H * D) +
              Arena::size<float>(H * kTile) + 4 * Arena::size<float>(H) +
              Arena::size<uint32_t>(H * kTile / 2));
  __m512* mvec = arena.take<__m512>(H);            // running max, broadcast in all lanes
  __m512* lvec = arena.take<__m512>(H);            // running sum, per lane
  __m512* svec = arena.take<__m512>(H);            // this tile's scores
  float* qbuf = arena.take<float>(H * D);
  float* acc = arena.take<float>(H * D);
  float* probs = arena.take<float>(H * kTile);
  float* alphas = arena.take<float>(H);
  uint32_t* wbf = arena.take<uint32_t>(H * kTile / 2);   // weights as bf16 pairs (2j, 2j+1)
  float* m2 = arena.take<float>(H);
  float* l = arena.take<float>(H);
  for (int64_t h = 0; h < H; ++h) {
    mvec[h] = _mm512_set1_ps(kNegInf);
    lvec[h] = _mm512_setzero_ps();
  }
  std::fill(acc, acc + H * D, 0.0f);
  prepare_query(p, t.row, qbuf);
  int64_t off[kTile], noff[kTile];
  const __m512 scale = _mm512_set1_ps(p.scale_log2);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);

  for (int64_t pos = t.start; pos < t.end; pos += kTile) {
    const int ntok = int(std::min<int64_t>(kTile, t.end - pos));
    for (int i = 0; i < ntok; ++i) off[i] = p.token_offset(t.row, pos + i);
    for (int i = ntok; i < kTile; ++i) off[i] = off[0];   // valid rows; their scores are masked
    const __mmask16 valid = __mmask16((1u << ntok) - 1u);
    // Rows of the tile kPrefetchTiles ahead, prefetched while this one is computed.
    int npf = 0;
    const int64_t ahead = pos + int64_t(kPrefetchTiles) * kTile;
    if (ahead < t.end) {
      npf = int(std::min<int64_t>(kTile, t.end - ahead));
      for (int i = 0; i < npf; ++i) noff[i] = p.token_offset(t.row, ahead + i);
    }

    // (A) The 16 scores of every query head (log2 domain, masked past ntok). The prefetches
    // of the tile ahead ride along: head g of the group issues those of tokens g, g + G, ...
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const T* kbase = p.k + kh * D;
      const T* vbase = p.v + kh * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        const float* qh = qbuf + h * D;
        __m512 parts[kTile];
        int64_t next_pf = g;
#pragma GCC unroll 16
        for (int i = 0; i < kTile; ++i) {
          parts[i] = dot_row<NC>(kbase + off[i], qh);
          if (i == next_pf) {
            if (i < npf) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
            next_pf += G;
          }
        }
        svec[h] = _mm512_mask_mov_ps(neg_inf, valid,
                                     _mm512_mul_ps(reduce_add_16x16(parts), scale));
      }
    }
    // (B) Online-softmax update of every head: H independent dependency chains back to back.
    for (int64_t h = 0; h < H; ++h) {
      const __m512 s = svec[h];
      const __m512 mnew = _mm512_max_ps(mvec[h], max_all(s));
      const __m512 alpha = exp2_ps(_mm512_sub_ps(mvec[h], mnew));   // 0 on the first tile
      const __m512 w = _mm512_maskz_mov_ps(valid, exp2_ps(_mm512_sub_ps(s, mnew)));
      lvec[h] = _mm512_fmadd_ps(lvec[h], alpha, w);
      mvec[h] = mnew;
      _mm512_storeu_ps(probs + h * kTile, w);
#if defined(__AVX512BF16__)
      if constexpr (kBf16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wbf + h * (kTile / 2)),
                            (__m256i)_mm512_cvtneps_pbh(w));
#endif
      alphas[h] = _mm512_cvtss_f32(alpha);
    }
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const T* kbase = p.k + kh * D;
      const T* vbase = p.v + kh * D;
      const float* probs_kh = probs + kh * G * kTile;
      const uint32_t* wbf_kh = wbf + kh * G * (kTile / 2);
      const float* alphas_kh = alphas + kh * G;
      (void)wbf_kh;
      // (C): PV for blocks of kGB heads.
      for (int64_t g0 = 0; g0 < G; g0 += kGB) {
        const int gb = int(std::min<int64_t>(kGB, G - g0));
        __m512 a[kGB][NC];
#pragma GCC unroll 16
        for (int gg = 0; gg < kGB; ++gg) {
          if (gg < gb) {
            const __m512 al = _mm512_set1_ps(alphas_kh[g0 + gg]);
            const float* ah = acc + (kh * G + g0 + gg) * D;
#pragma GCC unroll 16
            for (int c = 0; c < NC; ++c) a[gg][c] = _mm512_mul_ps(_mm512_loadu_ps(ah + 16 * c), al);
          }
        }
#if defined(__AVX512BF16__)
        if constexpr (kBf16) {
          // Two tokens per step: their V rows interleaved element by element, times the pair
          // of bf16 weights, accumulated in fp32 by dpbf16 (a row past ntok has weight 0).
          for (int i = 0; i < ntok; i += 2) {
            __m512i vv[NC];
#pragma GCC unroll 8
            for (int c = 0; c < NC / 2; ++c) {
              const __m512i r0 = _mm512_loadu_si512(vbase + off[i] + 32 * c);
              const __m512i r1 = _mm512_loadu_si512(vbase + off[i + 1] + 32 * c);
              vv[2 * c] = _mm512_unpacklo_epi16(r0, r1);
              vv[2 * c + 1] = _mm512_unpackhi_epi16(r0, r1);
            }
#pragma GCC unroll 16
            for (int gg = 0; gg < kGB; ++gg) {
              if (gg < gb) {
                const __m512i wp = _mm512_set1_epi32(int(wbf_kh[(g0 + gg) * (kTile / 2) + i / 2]));
#pragma GCC unroll 16
                for (int c = 0; c < NC; ++c)
                  a[gg][c] = _mm512_dpbf16_ps(a[gg][c], (__m512bh)vv[c], (__m512bh)wp);
              }
            }
          }
        } else
#endif
        for (int i = 0; i < ntok; ++i) {
          __m512 vr[NC];
          load_v<NC>(vbase + off[i], vr);
#pragma GCC unroll 16
          for (int gg = 0; gg < kGB; ++gg) {
            if (gg < gb) {
              const __m512 wi = _mm512_set1_ps(probs_kh[(g0 + gg) * kTile + i]);
#pragma GCC unroll 16
              for (int c = 0; c < NC; ++c) a[gg][c] = _mm512_fmadd_ps(wi, vr[c], a[gg][c]);
            }
          }
        }
#pragma GCC unroll 16
        for (int gg = 0; gg < kGB; ++gg) {
          if (gg < gb) {
            float* ah = acc + (kh * G + g0 + gg) * D;
#pragma GCC unroll 16
            for (int c = 0; c < NC; ++c) _mm512_storeu_ps(ah + 16 * c, a[gg][c]);
          }
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    m2[h] = _mm512_cvtss_f32(mvec[h]);
    l[h] = _mm512_reduce_add_ps(lvec[h]);
  }
  finish_task(p, t, acc, m2, l);
}
#endif  // LOONG_AVX512

// Chooses the implementation for a problem (fixed per call).
template <typename T>
using TaskFn = void (*)(const Problem<T>&, const Task&);

template <typename T>
TaskFn<T> pick_impl(int64_t D, int64_t H, int* layout) {
  *layout = kNatural;
#ifdef LOONG_AVX512
  {
    TaskFn<T> fn = nullptr;
    switch (D) {
      case 32: fn = run_task_avx512<T, 2>; break;
      case 64: fn = run_task_avx512<T, 4>; break;
      case 128: fn = run_task_avx512<T, 8>; break;
      case 256: fn = run_task_avx512<T, 16>; break;
      default: break;
    }
    if (fn) {
#if defined(__AVX512BF16__)
      if (!std::is_same<T, float>::value) *layout = kPairs;
#else
      if (!std::is_same<T, float>::value) *layout = kEvenOdd;
#endif
      return fn;
    }
  }
#endif
  (void)D; (void)H;
  return run_task_scalar<T>;
}

// Merges the partial results of a split row (parts [first, first + n)) into its output.
template <typename T>
void merge_parts(const Problem<T>& p, int64_t row, int64_t first, int64_t n) {
  std::vector<float> acc(p.D);
  for (int64_t h = 0; h < p.H; ++h) {
    float M = kNegInf;
    for (int64_t j = 0; j < n; ++j) M = std::max(M, p.part_m[(first + j) * p.H + h]);
    float L = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t idx = (first + j) * p.H + h;
      const float w = std::exp2(p.part_m[idx] - M);
      L += p.part_l[idx] * w;
      const float* src = p.part_acc + idx * p.D;
      for (int64_t d = 0; d < p.D; ++d) acc[d] += w * src[d];
    }
    write_final(p, row, h, acc.data(), M, L);
  }
}

template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* lens = context_lens.data_ptr<int32_t>();

  Problem<T> p;
  p.q = q.data_ptr<T>();
  p.q_s0 = q.stride(0); p.q_s1 = q.stride(1); p.q_s2 = q.stride(2);
  p.k = k_cache.data_ptr<T>();
  p.v = v_cache.data_ptr<T>();
  p.tables = block_tables.data_ptr<int32_t>();
  p.max_blocks = max_blocks;
  p.block_size = block_size;
  p.H = H; p.Hkv = Hkv; p.G = H / Hkv; p.D = D;
  p.scale_log2 = float(scale) * kLog2e;
  p.out = out.data_ptr<T>();
  p.lse = lse.data_ptr<float>();
  TaskFn<T> fn = pick_impl<T>(D, H, &p.layout);
  std::vector<int32_t> perm(D);
  for (int64_t i = 0; i < D; ++i) perm[i] = int32_t(natural_index(i, p.layout));
  p.perm = perm.data();

  // Chunk size: enough tasks for ~4 per thread over the whole batch, but at least 256 tokens
  // so the merge stays negligible; a multiple of the tile.
  const int64_t threads = std::max<int>(1, at::get_num_threads());
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += std::max<int32_t>(lens[b], 0);
  int64_t chunk = std::max<int64_t>(256, (total + 4 * threads - 1) / (4 * threads));
  chunk = (chunk + kTile - 1) / kTile * kTile;

  std::vector<Task> tasks;
  std::vector<int64_t> split_rows;          // rows with more than one task
  std::vector<int64_t> split_first, split_count;
  int64_t nparts = 0;
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b];
    if (n <= 0) continue;
    const int64_t nblk = (n + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(nblk <= max_blocks, "paged_decode_attention: context of ", n,
                      " tokens needs ", nblk, " blocks but block_tables has ", max_blocks,
                      " columns");
    for (int64_t j = 0; j < nblk; ++j) {
      const int32_t id = p.tables[b * max_blocks + j];
      TORCH_CHECK_INDEX(id >= 0 && id < num_blocks, "paged_decode_attention: block id ", id,
                        " (row ", b, ") is outside the cache's ", num_blocks, " blocks");
    }
    const int64_t nchunks = (n + chunk - 1) / chunk;
    if (nchunks == 1) {
      tasks.push_back({b, 0, n, -1});
      continue;
    }
    int64_t per = (n + nchunks - 1) / nchunks;
    per = (per + kTile - 1) / kTile * kTile;
    split_rows.push_back(b);
    split_first.push_back(nparts);
    int64_t count = 0;
    for (int64_t s = 0; s < n; s += per) {
      tasks.push_back({b, s, std::min(n, s + per), nparts++});
      ++count;
    }
    split_count.push_back(count);
  }

  // Empty rows: out 0, lse -inf.
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] > 0) continue;
    std::fill(p.out + b * H * D, p.out + (b + 1) * H * D, T(0.0f));
    std::fill(p.lse + b * H, p.lse + (b + 1) * H, kNegInf);
  }
  if (tasks.empty()) return;

  at::Tensor part_acc, part_ml;
  if (nparts > 0) {
    part_acc = at::empty({nparts, H, D}, at::kFloat);
    part_ml = at::empty({2, nparts, H}, at::kFloat);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_m = part_ml.data_ptr<float>();
    p.part_l = p.part_m + nparts * H;
  } else {
    p.part_acc = p.part_m = p.part_l = nullptr;
  }

  // Longest tasks first, handed out dynamically.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return (a.end - a.start) > (b.end - b.start);
  });
  const int64_t ntasks = int64_t(tasks.size());
  const int64_t nthr = std::min<int64_t>(threads, ntasks);
  if (nthr <= 1) {
    for (const Task& t : tasks) fn(p, t);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1); i < ntasks; i = next.fetch_add(1)) fn(p, tasks[i]);
    });
  }
  const int64_t nsplit = int64_t(split_rows.size());
  if (nsplit > 0) {
    at::parallel_for(0, nsplit, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        merge_parts(p, split_rows[i], split_first[i], split_count[i]);
    });
  }
}

}  // namespace

std::vector<at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& context_lens, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "paged_decode_attention: q must be [B, H, D] and caches "
                    "[num_blocks, block_size, Hkv, D]; got q", q.sizes(), " k_cache",
                    k_cache.sizes(), " v_cache", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D && Hkv > 0 && H % Hkv == 0,
                    "paged_decode_attention: q", q.sizes(), " does not fit cache ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == B &&
                        context_lens.dim() == 1 && context_lens.size(0) == B,
                    "paged_decode_attention: block_tables", block_tables.sizes(),
                    " / context_lens", context_lens.sizes(), " do not match batch ", B);
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_decode_attention: block_tables / context_lens must be contiguous int32");
  TORCH_CHECK(k_cache.size(1) > 0, "paged_decode_attention: block_size must be positive");

  at::Tensor out = at::empty({B, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H}, q.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  if (q.scalar_type() == at::kFloat) {
    paged_decode_impl<float>(q, k_cache, v_cache, block_tables, context_lens, scale, out, lse);
  } else if (q.scalar_type() == at::kBFloat16) {
    paged_decode_impl<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, scale,
                                     out, lse);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: dtype ", q.scalar_type(),
                " not supported (float32, bfloat16)");
  }
  return {out, lse};
}

// Which code path this build uses (for the benchmark and bug reports).
std::string cpu_ops_build_info() {
  std::string s = "loong_cpu_ops:";
#ifdef LOONG_AVX512
  s += " avx512";
#else
  s += " scalar";
#endif
#if defined(__AVX512BF16__)
  s += " avx512_bf16";
#endif
  return s;
}

}  // namespace loong
