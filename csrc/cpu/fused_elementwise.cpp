// Fused elementwise ops of the decoder layer: RMSNorm (optionally fused with the residual add),
// the rotate-half RoPE rotation in place, and SwiGLU's silu(gate) * up.
//
// Contracts (fp32 and bf16; same semantics as the torch fallbacks in loong/ops.py):
//   rms_norm(x [T, H], weight [H], eps) -> out [T, H]
//       Hugging Face RMSNorm: r = x / sqrt(mean(x^2) + eps) in fp32, cast to the dtype, times
//       weight in the dtype (bf16: the product of two bf16 is rounded once).
//   add_rms_norm(x [T, H], residual [T, H], weight [H], eps) -> out [T, H]
//       residual += x in residual's dtype (like `residual = residual + x`), then
//       rms_norm(residual).
//   rotary_(x [T, heads, D], cos [T, D], sin [T, D]) -> None
//       x = x * cos + cat(-x2, x1) * sin in place, x2/x1 the halves of each head. x may be
//       strided (a column slice of the qkv output); its last dim must be contiguous. bf16 rounds
//       the two products and the sum to bf16 like torch does, so results equal torch's.
//   silu_mul(gate_up [T, 2I]) -> out [T, I]
//       out = silu(gate) * up, gate the first half of each row; silu(g) = g / (1 + exp(-g)) is
//       rounded to the dtype before the product, as torch does.
// Statistics and arithmetic are fp32. Rows are split over threads (at::parallel_for) only when
// a tensor has more than kParallelMin elements: for the small tensors of a decode step the
// OpenMP fork/join costs more than the work. AVX-512 (F/BW/VL) code with masked tails; scalar
// code when the build lacks it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LOONG_FE_AVX512 1
#endif

namespace loong {
namespace {

using bf16 = c10::BFloat16;

constexpr int64_t kParallelMin = 65536;   // elements; below this one thread does it all

// Run fn(row_lo, row_hi) over [0, rows): threaded only for tensors above kParallelMin.
template <typename F>
void for_rows(int64_t rows, int64_t elems_per_row, const F& fn) {
  if (rows <= 0) return;
  const int64_t per = std::max<int64_t>(elems_per_row, 1);
  if (rows * per <= kParallelMin) {
    fn(int64_t(0), rows);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / per);
  at::parallel_for(0, rows, grain, fn);
}

// Scalar helpers: fp32 value rounded to the element type and back.
inline float round_to(float x, float) { return x; }
inline float round_to(float x, bf16) { return static_cast<float>(bf16(x)); }

#ifdef LOONG_FE_AVX512

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const bf16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN).
inline __m256i to_bf16_bits(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

inline void store(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store(bf16* p, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bf16_bits(x));
}

// x rounded to the element type, as fp32 (identity for fp32). Intermediate values only:
// a NaN with a full mantissa may come back as another NaN or -0 (torch results are NaN then
// anyway through the other operands).
inline __m512 round_to(__m512 x, float) { return x; }
inline __m512 round_to(__m512 x, bf16) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
}

// e^x: n = round(x log2 e), r = x - n ln2 (two-part ln2), e^r by its degree-7 Taylor
// polynomial (|r| <= ln2/2: truncation < 1e-8 relative), times 2^n (scalef: overflow gives
// inf, underflow 0, like expf).
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  static constexpr float kC[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120,
                                  1.0f / 720, 1.0f / 5040};
  __m512 p = _mm512_set1_ps(kC[7]);
#pragma GCC unroll 7
  for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[i]));
  return _mm512_scalef_ps(p, n);
}

#endif  // LOONG_FE_AVX512

// One row of (add_)rms_norm. res is the row to normalise (updated in place with x when ADD).
template <typename T, bool ADD>
inline void rms_row(const T* x, T* res, const T* w, T* out, int64_t H, float eps) {
  float ss;
#ifdef LOONG_FE_AVX512
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= H; i += 32) {
    __m512 a = load(res + i, 0xFFFF), b = load(res + i + 16, 0xFFFF);
    if (ADD) {
      a = round_to(_mm512_add_ps(a, load(x + i, 0xFFFF)), T());
      b = round_to(_mm512_add_ps(b, load(x + i + 16, 0xFFFF)), T());
      store(res + i, a, 0xFFFF);
      store(res + i + 16, b, 0xFFFF);
    }
    acc0 = _mm512_fmadd_ps(a, a, acc0);
    acc1 = _mm512_fmadd_ps(b, b, acc1);
  }
  for (; i < H; i += 16) {
    const __mmask16 m = tail_mask(H - i);
    __m512 a = load(res + i, m);
    if (ADD) {
      a = round_to(_mm512_add_ps(a, load(x + i, m)), T());
      store(res + i, a, m);
    }
    acc0 = _mm512_fmadd_ps(a, a, acc0);
  }
  ss = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float part[16] = {};   // 16 partial sums, like the vector code (closer to torch's sum)
  for (int64_t i = 0; i < H; ++i) {
    float a = static_cast<float>(res[i]);
    if (ADD) {
      res[i] = T(a + static_cast<float>(x[i]));
      a = static_cast<float>(res[i]);
    }
    part[i % 16] += a * a;
  }
  ss = 0.0f;
  for (float p : part) ss += p;
#endif
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#ifdef LOONG_FE_AVX512
  const __m512 rv = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < H; j += 16) {
    const __mmask16 m = tail_mask(H - j);
    const __m512 y = round_to(_mm512_mul_ps(load(res + j, m), rv), T());
    store(out + j, _mm512_mul_ps(y, load(w + j, m)), m);
  }
#else
  for (int64_t j = 0; j < H; ++j)
    out[j] = T(round_to(static_cast<float>(res[j]) * rstd, T()) * static_cast<float>(w[j]));
#endif
}

template <typename T>
inline void rotary_row(T* x, const T* c, const T* s, int64_t half) {
  // first half: x1 c1 - x2 s1; second half: x2 c2 + x1 s2 (products and sum rounded to T).
#ifdef LOONG_FE_AVX512
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    const __m512 x1 = load(x + i, m), x2 = load(x + half + i, m);
    const __m512 a = round_to(_mm512_mul_ps(x1, load(c + i, m)), T());
    const __m512 b = round_to(_mm512_mul_ps(x2, load(s + i, m)), T());
    const __m512 e = round_to(_mm512_mul_ps(x2, load(c + half + i, m)), T());
    const __m512 f = round_to(_mm512_mul_ps(x1, load(s + half + i, m)), T());
    store(x + i, _mm512_sub_ps(a, b), m);
    store(x + half + i, _mm512_add_ps(e, f), m);
  }
#else
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    const float a = round_to(x1 * static_cast<float>(c[i]), T());
    const float b = round_to(x2 * static_cast<float>(s[i]), T());
    const float e = round_to(x2 * static_cast<float>(c[half + i]), T());
    const float f = round_to(x1 * static_cast<float>(s[half + i]), T());
    x[i] = T(a - b);
    x[half + i] = T(e + f);
  }
#endif
}

template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* out, int64_t I) {
#ifdef LOONG_FE_AVX512
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = tail_mask(I - i);
    const __m512 gv = load(g + i, m);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 sv = round_to(_mm512_div_ps(gv, _mm512_add_ps(one, e)), T());
    store(out + i, _mm512_mul_ps(sv, load(u + i, m)), m);
  }
#else
  for (int64_t i = 0; i < I; ++i) {
    const float gv = static_cast<float>(g[i]);
    const float sv = round_to(gv / (1.0f + std::exp(-gv)), T());
    out[i] = T(sv * static_cast<float>(u[i]));
  }
#endif
}

void check_float_dtype(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 only, got ", t.scalar_type());
}

template <bool ADD>
at::Tensor rms_norm_common(const at::Tensor& x, const at::Tensor* residual,
                           const at::Tensor& weight, double eps, const char* name) {
  check_float_dtype(x, name);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.stride(1) == 1, name,
                    ": x must be [T, H] with a contiguous last dim, got ", x.sizes(), " strides ",
                    x.strides());
  const int64_t T_ = x.size(0), H = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous() &&
                        weight.scalar_type() == x.scalar_type(),
                    name, ": weight must be a contiguous [", H, "] tensor of x's dtype");
  const at::Tensor& src = ADD ? *residual : x;
  if (ADD) {
    TORCH_CHECK_VALUE(src.sizes() == x.sizes() && src.stride(1) == 1 &&
                          src.scalar_type() == x.scalar_type() && src.device().is_cpu(),
                      name, ": residual must match x (shape, dtype) with a contiguous last dim");
  }
  at::Tensor out = at::empty({T_, H}, x.options());
  const int64_t xs = x.stride(0), rs = src.stride(0);
  const float e = static_cast<float>(eps);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* rp = const_cast<T*>(src.data_ptr<T>());
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for_rows(T_, H, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        rms_row<T, ADD>(xp + t * xs, rp + t * rs, wp, op + t * H, H, e);
    });
  };
  if (x.scalar_type() == at::kFloat) run(float()); else run(bf16());
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_common<false>(x, nullptr, weight, eps, "rms_norm");
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps) {
  return rms_norm_common<true>(x, &residual, weight, eps, "add_rms_norm");
}

void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float_dtype(x, "rotary_");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
                    "rotary_: x must be [T, heads, D] with even D and a contiguous last dim, got ",
                    x.sizes(), " strides ", x.strides());
  const int64_t T_ = x.size(0), NH = x.size(1), D = x.size(2);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == T_ && t->size(1) == D &&
                          t->is_contiguous() && t->scalar_type() == x.scalar_type() &&
                          t->device().is_cpu(),
                      "rotary_: cos/sin must be contiguous [", T_, ", ", D,
                      "] tensors of x's dtype");
  }
  const int64_t st = x.stride(0), sh = x.stride(1);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    for_rows(T_, NH * D, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t)
        for (int64_t h = 0; h < NH; ++h)
          rotary_row<T>(xp + t * st + h * sh, cp + t * D, sp + t * D, D / 2);
    });
  };
  if (x.scalar_type() == at::kFloat) run(float()); else run(bf16());
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float_dtype(gate_up, "silu_mul");
  TORCH_CHECK_VALUE(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
                    "silu_mul: gate_up must be [T, 2I] with a contiguous last dim, got ",
                    gate_up.sizes());
  const int64_t T_ = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = at::empty({T_, I}, gate_up.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for_rows(T_, I, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) silu_mul_row<T>(gp + t * gs, gp + t * gs + I, op + t * I, I);
    });
  };
  if (gate_up.scalar_type() == at::kFloat) run(float()); else run(bf16());
  return out;
}

}  // namespace loong
