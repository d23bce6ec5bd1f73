// The decoder layers of one decode step in one native call: no Python between the ops.
//
// A decode step on a CPU runs ~12 ops per layer on a few rows; from Python each costs a
// dispatch (5-30 us) that is larger than its arithmetic, so on a small model the step's time is
// mostly interpreter. This loop calls the same kernels as the eager path
// (loong/model/llama.py DecoderLayer.forward + the attention callable), in the same order on the
// same inputs, so its results are bitwise identical to the eager path's:
//
//   for each layer l:
//     qkv = linear(h, Wqkv_l, bqkv_l)       (linear_vnni on a packed copy from 2 bf16 rows,
//                                            linear_small for 1, else at::linear)
//     rotary_(q and k heads of qkv, cos, sin)          in place
//     out = attention(l, q, k, v)
//     h = add_rms_norm(linear(out, Wo_l, bo_l), residual, post_norm_l)
//     h = add_rms_norm(linear(silu_mul(linear(h, Wgu_l)), Wdown_l), residual, next_norm_l)
//
// Attention is either the paged decode of one instance (kv [L, 2, blocks, block_size, Hkv, D]:
// write k/v at `slots`, then paged_decode_attention over `tables`/`lens`), or a Python callable
// `attn(layer, q, k, v) -> out` (a cluster member's multi-master exchange), called with the GIL
// held; everything else runs with the GIL released.
//
// The same structure is what a CUDA graph captures per batch-size bucket on a GPU: one call
// per step whose inputs (rows, slots, tables, lens) change while the op sequence does not.
//
// Weights: `packed_weights` is empty or parallel to `layer_weights`: packed copies of the
// projections (loong/ops/packed_weights.py) that steps of 2 or more bf16 rows use, as
// loong.ops.linear does, and empty dense tensors elsewhere. `q8_weights` / `q8_scales` likewise:
// the projections' Q8_0 blocks (loong/ops/quantized_weights.py) for steps of 1-8 bf16 rows.
// `layer_weights` holds kPerLayer tensors per layer in this order: qkv [Q+2KV, H],
// qkv_bias [Q+2KV] or empty, o_proj [H, Q], o_bias [H] or empty, post_norm [H], gate_up [2I, H],
// down [H, I], next_norm [H] (the next layer's input norm, or the final norm). Python checks
// that the inputs suit the kernels (loong/ops/__init__.py decoder_layers), as it does for each
// kernel in the eager path.

#include <torch/extension.h>

#include <cstring>
#include <vector>

namespace loong {

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias);
bool linear_small_supported();
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias);
bool linear_q8_supported();
at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias);
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps);
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
std::vector<at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& context_lens, double scale);

namespace {

constexpr size_t kPerLayer = 8;
constexpr int64_t kSkinnyMaxRows = 8;   // = loong.ops.SKINNY_MAX_ROWS
constexpr int64_t kPackedMinRows = 2;   // = loong.ops.PACKED_MIN_ROWS

// oneDNN's linear on a weight it packed ahead (torch.ops.mkldnn._linear_pointwise, what
// loong.ops.packed_weights.linear_packed calls).
at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed,
                            const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            c10::string_view, c10::List<c10::optional<at::Scalar>>,
                            c10::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<c10::optional<at::Scalar>>(),
                 c10::optional<c10::string_view>(""));
}

// loong.ops.linear's dispatch, in C++ (the same kernel for the same inputs). `packed` is the
// weight's packed copy (vnni_pack's flat bf16 tensor where this build has linear_vnni, taken
// from kPackedMinRows bf16 rows up; else oneDNN's opaque tensor, taken beyond kSkinnyMaxRows),
// or an empty dense tensor where there is none. Order for 1-8 rows: Q8_0 blocks, then the
// packed copy, then the skinny kernel on the plain weight.
// `qs` / `scales`: the weight's Q8_0 blocks for steps of 1 to kSkinnyMaxRows bf16 rows, or empty.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  const at::Tensor& packed, const at::Tensor& qs, const at::Tensor& scales) {
  const bool has_bias = b.defined() && b.numel() > 0;
  const c10::optional<at::Tensor> bias = has_bias ? c10::optional<at::Tensor>(b) : c10::nullopt;
  const int64_t m = x.size(0);
  // x bf16 with a contiguous last dim and a contiguous bf16 bias (or none): what our kernels take.
  const bool bf16_rows = x.scalar_type() == at::kBFloat16 &&
                         (x.stride(1) == 1 || x.size(1) <= 1) &&
                         (!has_bias || (b.scalar_type() == at::kBFloat16 && b.is_contiguous()));
  const bool ours = packed.defined() && !packed.is_mkldnn() && packed.numel() > 0 && bf16_rows;
  if (m > kSkinnyMaxRows && packed.defined() && packed.is_mkldnn() &&
      x.scalar_type() == at::kBFloat16) {
    return linear_pointwise(x, packed, bias);
  }
  if (m >= 1 && m <= kSkinnyMaxRows && qs.defined() && qs.numel() > 0 && bf16_rows &&
      linear_q8_supported()) {
    return linear_q8(x, qs, scales, bias);
  }
  if (m >= kPackedMinRows && ours) return linear_vnni(x, packed, w.size(0), bias);
  if (m >= 1 && m <= kSkinnyMaxRows && bf16_rows && w.scalar_type() == at::kBFloat16 &&
      w.is_contiguous() && linear_small_supported()) {
    return linear_small(x, w, bias);
  }
  return at::linear(x, w, bias);
}

}  // namespace

at::Tensor decoder_layers(at::Tensor h, at::Tensor residual, const at::Tensor& cos,
                          const at::Tensor& sin, const std::vector<at::Tensor>& layer_weights,
                          const std::vector<at::Tensor>& packed_weights,
                          const std::vector<at::Tensor>& q8_weights,
                          const std::vector<at::Tensor>& q8_scales, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                          const py::object& attn, const at::Tensor& kv, const at::Tensor& slots,
                          const at::Tensor& tables, const at::Tensor& lens, double scale) {
  TORCH_CHECK(layer_weights.size() % kPerLayer == 0, "decoder_layers: ", kPerLayer,
              " weights per layer expected, got ", layer_weights.size());
  TORCH_CHECK(h.dim() == 2 && residual.sizes() == h.sizes(), "decoder_layers: h and residual [T, H]");
  TORCH_CHECK(packed_weights.empty() || packed_weights.size() == layer_weights.size(),
              "decoder_layers: packed_weights empty or one per layer weight");
  TORCH_CHECK((q8_weights.empty() && q8_scales.empty()) ||
                  (q8_weights.size() == layer_weights.size() &&
                   q8_scales.size() == layer_weights.size()),
              "decoder_layers: q8_weights / q8_scales empty or one per layer weight");
  const int64_t layers = static_cast<int64_t>(layer_weights.size() / kPerLayer);
  const at::Tensor none;
  const bool paged = attn.is_none();
  if (paged) {
    TORCH_CHECK(kv.dim() == 6 && kv.size(0) == layers && kv.size(1) == 2 && kv.is_contiguous(),
                "decoder_layers: kv [L, 2, blocks, block_size, Hkv, D] expected");
    TORCH_CHECK(slots.size(0) == h.size(0) && lens.size(0) == h.size(0) &&
                    tables.size(0) == h.size(0),
                "decoder_layers: one slot, table and length per row");
  }
  const int64_t t = h.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  // Direct k/v writes (below) need int64 slots inside the cache, a cache of h's dtype whose
  // slot rows are Hkv * D contiguous elements; otherwise index_copy_ writes (and checks).
  at::Tensor slots64;
  const int64_t* slot_ptr = nullptr;
  bool direct_kv_write = false;
  const int64_t elem = h.element_size();
  if (paged && slots.scalar_type() == at::kLong && kv.scalar_type() == h.scalar_type() &&
      kv.size(4) == num_kv_heads && kv.size(5) == head_dim) {
    slots64 = slots.contiguous();
    slot_ptr = slots64.data_ptr<int64_t>();
    const int64_t capacity = kv.size(2) * kv.size(3);
    direct_kv_write = true;
    for (int64_t i = 0; i < t; ++i) {
      TORCH_CHECK(slot_ptr[i] >= 0 && slot_ptr[i] < capacity, "decoder_layers: slot ",
                  slot_ptr[i], " outside the cache of ", capacity, " slots");
    }
  }
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = layer_weights.data() + l * kPerLayer;
    const at::Tensor* p = packed_weights.empty() ? nullptr : packed_weights.data() + l * kPerLayer;
    const at::Tensor* qw = q8_weights.empty() ? nullptr : q8_weights.data() + l * kPerLayer;
    const at::Tensor* qsc = q8_scales.empty() ? nullptr : q8_scales.data() + l * kPerLayer;
    // Projection i with its other forms (packed copy, Q8_0 blocks and scales), where given.
    auto proj = [&](const at::Tensor& x, int i, const at::Tensor& bias) {
      return linear(x, w[i], bias, p ? p[i] : none, qw ? qw[i] : none, qsc ? qsc[i] : none);
    };
    at::Tensor qkv = proj(h, 0, w[1]);
    rotary_(qkv.narrow(1, 0, q_size + kv_size).view({t, -1, head_dim}), cos, sin);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({t, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({t, num_kv_heads, head_dim});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, num_kv_heads, head_dim});
    at::Tensor o;
    if (paged) {
      at::Tensor k_cache = kv.select(0, l).select(0, 0);
      at::Tensor v_cache = kv.select(0, l).select(0, 1);
      if (direct_kv_write && qkv.is_contiguous()) {
        // The new token's k and v rows, copied straight into their slots: what index_copy_
        // does, without its dispatch and TensorIterator set-up on every layer (slots were
        // checked against the cache once, above).
        char* k_dst = static_cast<char*>(k_cache.data_ptr());
        char* v_dst = static_cast<char*>(v_cache.data_ptr());
        const char* src = static_cast<const char*>(qkv.data_ptr());
        const int64_t row_bytes = kv_size * elem, src_stride = qkv.size(1) * elem;
        for (int64_t i = 0; i < t; ++i) {
          const char* row = src + i * src_stride + q_size * elem;
          std::memcpy(k_dst + slot_ptr[i] * row_bytes, row, row_bytes);
          std::memcpy(v_dst + slot_ptr[i] * row_bytes, row + row_bytes, row_bytes);
        }
      } else {
        k_cache.view({-1, num_kv_heads, head_dim}).index_copy_(0, slots, k);
        v_cache.view({-1, num_kv_heads, head_dim}).index_copy_(0, slots, v);
      }
      o = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)[0];
    } else {
      py::gil_scoped_acquire gil;
      o = attn(l, q, k, v).cast<at::Tensor>();
    }
    o = proj(o.reshape({t, q_size}), 2, w[3]);
    h = add_rms_norm(o, residual, w[4], eps);
    at::Tensor mlp = proj(silu_mul(proj(h, 5, none)), 6, none);
    h = add_rms_norm(mlp, residual, w[7], eps);
  }
  return h;
}

}  // namespace loong
