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
// Work is split into tasks of (row, token range). A task walks its range in tiles of 16 token
// positions (the KV rows of a tile are addressed through the block table, so any block size
// works and nothing is gathered). Inside a tile, for every kv head, it computes the 16 scores
// of each of the G query heads that share the head (the 16 dot products are reduced together
// with a transpose-add tree), updates a running max / sum in fp32 (online softmax, log2
// domain), and accumulates V in fp32. All kv heads of a tile are processed together, so the
// tile's K (and V) bytes are read front to back. A row longer than the chunk size is split
// into several tasks (split-K); their partial results are merged through log-sum-exp at the
// end. Tasks are handed out dynamically (an atomic counter) to at::parallel_for's threads.
//
// SIMD: AVX-512F (+BW) code for head sizes 32/64/128/256; bf16 K dot products use
// _mm512_dpbf16_ps when AVX512_BF16 is available, else bf16 is widened by a shift / mask.
// Widening a 32-element bf16 vector that way yields its even and odd elements as two fp32
// vectors, so fp32 accumulators of bf16 caches hold each 32-element chunk "deinterleaved"
// (evens, then odds); the order is undone when the output is written. Without AVX-512, or
// for other head sizes, a plain scalar implementation runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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
  bool deinterleaved;          // accumulators hold 32-element chunks as evens then odds
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

// Position in natural order of the element stored at accumulator index i.
inline int64_t natural_index(int64_t i, bool deinterleaved) {
  if (!deinterleaved) return i;
  const int64_t c = i & ~int64_t(31), r = i & 31;
  return r < 16 ? c + 2 * r : c + 2 * (r - 16) + 1;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Writes one (row, head) result: out = acc / l (undoing the accumulator order), lse natural log.
template <typename T>
void write_final(const Problem<T>& p, int64_t row, int64_t h, const float* acc, float m2,
                 float l) {
  T* o = p.out + (row * p.H + h) * p.D;
  const float inv = 1.0f / l;
  for (int64_t i = 0; i < p.D; ++i) o[natural_index(i, p.deinterleaved)] = T(acc[i] * inv);
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

// Lane i of the result is the sum of the 16 lanes of v[i] (v is clobbered). Each level adds
// the even and odd lanes of neighbouring vectors, halving the vector count.
inline __m512 reduce_add_16x16(__m512* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                        29, 31);
#pragma GCC unroll 4
  for (int n = 16; n > 1; n /= 2) {
#pragma GCC unroll 8
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]));
  }
  return v[0];
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
      for (int64_t d = 0; d < p.D; ++d) dst[d] = static_cast<float>(src[natural_index(d, true)
                                                                       * p.q_s2]);
#endif
    }
  }
}


// Prefetch distance in tiles. The per-tile prefetches go to L2 (T1) and are spread over the
// tile's work, one (token, kv head) row segment at a time: issued in one burst they stall the
// core (the prefetches fill the load queue), and without them a core reads randomly placed
// blocks at roughly half the speed it streams.
static int g_pf_dist = 2;
static int g_pf_mode = 1;

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

template <typename T, int NC>
void run_task_avx512(const Problem<T>& p, const Task& t) {
  constexpr int D = NC * 16;
  constexpr int kRowBytes = D * int(sizeof(T));
  constexpr bool kBf16 = !std::is_same<T, float>::value;
  const int64_t H = p.H, Hkv = p.Hkv, G = p.G;
  std::vector<float> qbuf(H * D), acc_v(H * D, 0.0f), m2(H, kNegInf), l(H, 0.0f);
  float* acc = acc_v.data();
  prepare_query(p, t.row, qbuf.data());
  alignas(64) float probs[kTile];
  alignas(64) float vconv[kBf16 ? kTile * D : 16];
  int64_t off[kTile], noff[kTile];
  const __m512 scale = _mm512_set1_ps(p.scale_log2);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const int pf_dist = g_pf_dist, pf_mode = g_pf_mode;

  for (int64_t pos = t.start; pos < t.end; pos += kTile) {
    const int ntok = int(std::min<int64_t>(kTile, t.end - pos));
    for (int i = 0; i < ntok; ++i) off[i] = p.token_offset(t.row, pos + i);
    for (int i = ntok; i < kTile; ++i) off[i] = off[0];   // valid rows; their scores are masked
    const __mmask16 valid = __mmask16((1u << ntok) - 1u);
    // Rows of the tile pf_dist tiles ahead, prefetched while this one is computed.
    int npf = 0;
    const int64_t ahead = pos + int64_t(pf_dist) * kTile;
    if (pf_dist > 0 && ahead < t.end) {
      npf = int(std::min<int64_t>(kTile, t.end - ahead));
      for (int i = 0; i < npf; ++i) noff[i] = p.token_offset(t.row, ahead + i);
    }

    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const T* kbase = p.k + kh * D;
      const T* vbase = p.v + kh * D;
      if constexpr (kBf16) {
        // Widen this tile's V rows once per kv head.
        for (int i = 0; i < ntok; ++i) {
          if (i < npf) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
          const T* vr = vbase + off[i];
#pragma GCC unroll 8
          for (int c = 0; c < NC / 2; ++c) {
            const __m512i x = _mm512_loadu_si512(vr + 32 * c);
            _mm512_store_ps(vconv + i * D + 32 * c, bf16_even(x));
            _mm512_store_ps(vconv + i * D + 32 * c + 16, bf16_odd(x));
          }
        }
        for (int i = ntok; i < npf; ++i) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
      } else if (pf_mode == 1) {
        for (int i = 0; i < npf; ++i) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        const float* qh = qbuf.data() + h * D;
        // 16 scores of this head.
        __m512 parts[kTile];
#pragma GCC unroll 16
        for (int i = 0; i < kTile; ++i) parts[i] = dot_row<NC>(kbase + off[i], qh);
        __m512 s = _mm512_mul_ps(reduce_add_16x16(parts), scale);
        s = _mm512_mask_mov_ps(neg_inf, valid, s);
        // Online softmax update.
        const float mt = _mm512_reduce_max_ps(s);
        const float mnew = std::max(m2[h], mt);
        const float alpha = std::exp2(m2[h] - mnew);
        const __m512 w = exp2_ps(_mm512_sub_ps(s, _mm512_set1_ps(mnew)));
        l[h] = l[h] * alpha + _mm512_reduce_add_ps(w);
        m2[h] = mnew;
        _mm512_store_ps(probs, w);
        // acc = acc * alpha + sum_i w_i V_i
        float* ah = acc + h * D;
        __m512 a[NC];
        const __m512 av = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) a[c] = _mm512_mul_ps(_mm512_loadu_ps(ah + 16 * c), av);
        const bool pf_here = !kBf16 && pf_mode == 2 && g == 0;
        for (int i = 0; i < ntok; ++i) {
          const __m512 wi = _mm512_set1_ps(probs[i]);
          const float* vr;
          if constexpr (kBf16) {
            vr = vconv + i * D;
          } else {
            vr = reinterpret_cast<const float*>(vbase + off[i]);
            if (pf_here && i < npf) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
          }
#pragma GCC unroll 16
          for (int c = 0; c < NC; ++c) a[c] = _mm512_fmadd_ps(wi, _mm512_loadu_ps(vr + 16 * c), a[c]);
        }
        if (pf_here)
          for (int i = ntok; i < npf; ++i) prefetch_l2<kRowBytes>(kbase + noff[i], vbase + noff[i]);
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(ah + 16 * c, a[c]);
      }
    }
  }
  finish_task(p, t, acc, m2.data(), l.data());
}
#endif  // LOONG_AVX512

// Chooses the implementation for a problem (fixed per call).
template <typename T>
using TaskFn = void (*)(const Problem<T>&, const Task&);

template <typename T>
TaskFn<T> pick_impl(int64_t D, int64_t H, bool* deinterleaved) {
  *deinterleaved = false;
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
      *deinterleaved = !std::is_same<T, float>::value;
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
  TaskFn<T> fn = pick_impl<T>(D, H, &p.deinterleaved);
  { const char* e = std::getenv("LOONG_PF_DIST"); g_pf_dist = e ? std::atoi(e) : 2;
    e = std::getenv("LOONG_PF_MODE"); g_pf_mode = e ? std::atoi(e) : 1; }

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
