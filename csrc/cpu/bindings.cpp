// Python bindings of the loong CPU ops (module name set by the build: loong_cpu_ops).
#include <torch/extension.h>

#include <string>
#include <vector>

namespace loong {
std::vector<at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& context_lens, double scale);
std::vector<at::Tensor> lse_merge(const at::Tensor& out_a, const at::Tensor& lse_a,
                                  const at::Tensor& out_b, const at::Tensor& lse_b);
std::string cpu_ops_build_info();
std::vector<at::Tensor> prefill_attention(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale, bool causal);
bool prefill_attention_supported(bool is_bf16, int64_t head_dim);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight,
                        double eps);
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor kv_pack(const at::Tensor& kv, const at::Tensor& slots);
void kv_unpack_(at::Tensor kv, const at::Tensor& slots, const at::Tensor& packed);
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias);
bool linear_small_supported();
at::Tensor argmax_rows(const at::Tensor& x);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias);
bool linear_q8_supported();
at::Tensor vnni_pack(const at::Tensor& w);
int64_t vnni_packed_numel(int64_t N, int64_t K);
at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias);
bool linear_vnni_supported();
at::Tensor decoder_layers(at::Tensor h, at::Tensor residual, const at::Tensor& cos,
                          const at::Tensor& sin, const std::vector<at::Tensor>& layer_weights,
                          const std::vector<at::Tensor>& packed_weights,
                          const std::vector<at::Tensor>& q8_weights,
                          const std::vector<at::Tensor>& q8_scales, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, double eps,
                          const py::object& attn, const at::Tensor& kv, const at::Tensor& slots,
                          const at::Tensor& tables, const at::Tensor& lens, double scale);
}  // namespace loong

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loong CPU kernels (see csrc/README.md)";
  m.def("paged_decode_attention", &loong::paged_decode_attention,
        "paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) "
        "-> [out, lse]",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("lse_merge", &loong::lse_merge, "lse_merge(out_a, lse_a, out_b, lse_b) -> [out, lse]",
        py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention", &loong::prefill_attention,
        "prefill_attention(q, k, v, scale, causal) -> [out, lse]", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("scale"), py::arg("causal"),
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_supported", &loong::prefill_attention_supported,
        "whether prefill_attention runs for (is_bf16, head_dim) in this build",
        py::arg("is_bf16"), py::arg("head_dim"));
  m.def("rms_norm", &loong::rms_norm, "rms_norm(x [T, H], weight [H], eps) -> out (HF RMSNorm)",
        py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &loong::add_rms_norm,
        "add_rms_norm(x, residual, weight, eps) -> rms_norm(residual += x)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_", &loong::rotary_, "rotary_(x [T, heads, D], cos [T, D], sin [T, D]) in place",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &loong::silu_mul, "silu_mul(gate_up [T, 2I]) -> silu(gate) * up [T, I]",
        py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
  m.def("kv_pack", &loong::kv_pack,
        "kv_pack(kv [L, 2, blocks, block_size, H, D], slots [n] int64) -> packed [L, 2, n, H, D]",
        py::arg("kv"), py::arg("slots"), py::call_guard<py::gil_scoped_release>());
  m.def("kv_unpack_", &loong::kv_unpack_,
        "kv_unpack_(kv, slots [n] int64, packed [L, 2, n, H, D]): write packed rows into the "
        "slots of kv in place",
        py::arg("kv"), py::arg("slots"), py::arg("packed"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_small", &loong::linear_small,
        "linear_small(x [M<=8, K] bf16, w [N, K] bf16, bias [N] or None) -> x w^T + b [M, N]",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::call_guard<py::gil_scoped_release>());
  m.def("linear_small_supported", &loong::linear_small_supported,
        "whether linear_small runs in this build (AVX512_BF16)");
  m.def("linear_q8", &loong::linear_q8,
        "linear_q8(x [M<=8, K] bf16, qs [N, K] int8, scales [N, K/32] f32, bias [N] or None) "
        "-> x W^T + b with W = bf16(scales * qs) [M, N]",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_q8_supported", &loong::linear_q8_supported,
        "whether linear_q8 runs in this build (AVX512_BF16)");
  m.def("vnni_pack", &loong::vnni_pack,
        "vnni_pack(w [N, K] bf16) -> the flat packed copy linear_vnni takes (pairs of K, "
        "panels of 48 columns; see csrc/cpu/vnni_linear.cpp)",
        py::arg("w"), py::call_guard<py::gil_scoped_release>());
  m.def("vnni_packed_numel", &loong::vnni_packed_numel,
        "vnni_packed_numel(N, K) -> elements of vnni_pack's result for a [N, K] weight",
        py::arg("n"), py::arg("k"));
  m.def("linear_vnni", &loong::linear_vnni,
        "linear_vnni(x [M, K] bf16, packed, n, bias [N] or None) -> x W^T + b [M, N]",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_vnni_supported", &loong::linear_vnni_supported,
        "whether linear_vnni runs in this build (AVX512_BF16)");
  m.def("argmax_rows", &loong::argmax_rows,
        "argmax_rows(x [B, V] fp32) -> int64 [B]: x.argmax(-1) (ties lowest, NaN first)",
        py::arg("x"), py::call_guard<py::gil_scoped_release>());
  m.def("decoder_layers", &loong::decoder_layers,
        "decoder_layers(h, residual, cos, sin, layer_weights, packed_weights, q8_weights, "
        "q8_scales, num_heads, "
        "num_kv_heads, head_dim, eps, attn, kv, slots, tables, lens, scale) -> h: every decoder layer of a decode step "
        "(attn None: paged decode over kv; else attn(layer, q, k, v) -> out, called with the GIL)",
        py::arg("h"), py::arg("residual"), py::arg("cos"), py::arg("sin"),
        py::arg("layer_weights"), py::arg("packed_weights"), py::arg("q8_weights"),
        py::arg("q8_scales"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("eps"), py::arg("attn"), py::arg("kv"), py::arg("slots"),
        py::arg("tables"), py::arg("lens"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("build_info", &loong::cpu_ops_build_info, "which SIMD paths this build uses");
}
