// Merge of two partial attention results over disjoint key sets through their log-sum-exp.
//
// Same contract and arithmetic as loong.attention.lse.merge_attention:
//   out_a, out_b [..., D] (same shape and dtype: fp32, bf16 or fp16, contiguous)
//   lse_a, lse_b [...] fp32 contiguous (natural log)
//   m = max(lse_a, lse_b) (0 where both are -inf), w_x = exp(lse_x - m), s = w_a + w_b,
//   lse = m + log(s), out = out_a * w_a / s + out_b * w_b / s (0 where s == 0), math in fp32,
//   out in out_a's dtype, lse fp32. An empty side (lse -inf) contributes nothing; two empty
//   sides give out 0, lse -inf.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace loong {
namespace {

template <typename T>
void lse_merge_impl(const T* oa, const float* la, const T* ob, const float* lb, T* out,
                    float* lse, int64_t rows, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float a = la[r], b = lb[r];
      float m = std::max(a, b);
      if (std::isinf(m) && m < 0) m = 0.0f;
      float wa = std::exp(a - m), wb = std::exp(b - m);
      const float s = wa + wb;
      lse[r] = m + std::log(s);                    // s == 0 gives -inf
      const float inv = s > 0.0f ? 1.0f / s : 0.0f;
      wa *= inv;
      wb *= inv;
      const T* pa = oa + r * D;
      const T* pb = ob + r * D;
      T* po = out + r * D;
      for (int64_t d = 0; d < D; ++d)
        po[d] = T(static_cast<float>(pa[d]) * wa + static_cast<float>(pb[d]) * wb);
    }
  });
}

}  // namespace

std::vector<at::Tensor> lse_merge(const at::Tensor& out_a, const at::Tensor& lse_a,
                                  const at::Tensor& out_b, const at::Tensor& lse_b) {
  TORCH_CHECK_VALUE(out_a.dim() >= 1 && out_a.sizes() == out_b.sizes(),
                    "lse_merge: out shapes differ ", out_a.sizes(), " vs ", out_b.sizes());
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK_VALUE(lse_a.sizes() == lead && lse_b.sizes() == lead,
                    "lse_merge: lse shapes ", lse_a.sizes(), " / ", lse_b.sizes(),
                    " must equal out shape without its last dim ", lead);
  TORCH_CHECK(out_a.scalar_type() == out_b.scalar_type(), "lse_merge: out dtypes differ");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat,
              "lse_merge: lse must be float32");
  TORCH_CHECK(out_a.device().is_cpu() && out_b.device().is_cpu() && lse_a.device().is_cpu() &&
                  lse_b.device().is_cpu(),
              "lse_merge: CPU tensors only");
  TORCH_CHECK(out_a.is_contiguous() && out_b.is_contiguous() && lse_a.is_contiguous() &&
                  lse_b.is_contiguous(),
              "lse_merge: inputs must be contiguous");
  at::Tensor out = at::empty_like(out_a, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty_like(lse_a, at::MemoryFormat::Contiguous);
  const int64_t D = out_a.size(-1);
  const int64_t rows = lse_a.numel();
  if (rows == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_a.scalar_type(), "lse_merge",
                                  [&] {
    lse_merge_impl<scalar_t>(out_a.data_ptr<scalar_t>(), lse_a.data_ptr<float>(),
                             out_b.data_ptr<scalar_t>(), lse_b.data_ptr<float>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<float>(), rows, D);
  });
  return {out, lse};
}

}  // namespace loong
