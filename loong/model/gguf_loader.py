"""GGUF files -> (ModelConfig, Hugging Face-named tensors, Tokenizer).

Owns: reading a `.gguf` with `gguf.GGUFReader`, turning llama.cpp metadata into a
`ModelConfig`, renaming llama.cpp tensors to Hugging Face Llama names, dequantizing them
with `gguf.quants.dequantize`, and undoing llama.cpp's Q/K row permutation.
Must not import transformers (it is only the reference our tests compare against), nor the
model code: this module produces plain tensors; `loader.py` validates their shapes.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.tokenizer import Tokenizer

# llama.cpp `general.architecture` -> Hugging Face architecture.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
# Architectures whose converter interleaves Q/K rows for llama.cpp's "normal" RoPE layout.
_PERMUTED = {"llama", "mistral"}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
                "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
                "attn_output.weight": "self_attn.o_proj.weight",
                "attn_output.bias": "self_attn.o_proj.bias",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor name, or None when we do not use it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation (rotate-half -> interleaved pairs) per head.

    The converter writes, per head, rows [r0, r(h), r1, r(h+1), ...] where h = head_dim/2;
    Hugging Face keeps [r0 .. r(h-1), r(h) .. r(2h-1)]. Works on weights and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelLoadError(f"cannot un-permute a Q/K tensor of {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def tensor_to_torch(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as torch: F32 -> float32, F16 -> float16, BF16 -> bfloat16,
    every quantized type -> float32 (dequantized by the gguf package)."""
    import gguf

    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists dims inner-first
    data = tensor.data
    if qtype == gguf.GGMLQuantizationType.F32:
        out = torch.from_numpy(np.array(data, dtype=np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        out = torch.from_numpy(np.array(data, dtype=np.float16))
    elif qtype == gguf.GGMLQuantizationType.BF16:
        bits = np.ascontiguousarray(np.asarray(data)).view(np.uint16).copy()
        out = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    else:
        try:
            arr = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise ModelLoadError(f"GGUF tensor '{tensor.name}' has type {qtype.name}, which the "
                                 "installed gguf package cannot dequantize") from None
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out.reshape(shape)


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every GGUF key-value as plain Python (str, int, float, bool, lists of those)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we need
            continue
    return meta


def _llama3_rope_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Rebuild Llama 3 `rope_scaling` from llama.cpp's `rope_freqs` tensor (the per-frequency
    divisors the converter precomputes). Assumes low_freq_factor = 1, as every Llama 3.x does;
    the smooth band then fixes high_freq_factor and the original context length."""
    factors = factors.astype(np.float64).reshape(-1)
    factor = float(factors.max())
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if factor <= 1.0:
        return params
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)[: len(factors)] / head_dim)
    mid = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    if mid.sum() >= 2:
        # 1/f = (1 - s)/factor + s with s = a*inv_freq + b, a = L/(2*pi*(hi-lo)), b = -lo/(hi-lo)
        s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(inv_freq[mid], s, 1)
        if b < 0 and a > 0:
            high = 1.0 - 1.0 / b
            params["high_freq_factor"] = round(float(high), 4)
            params["original_max_position_embeddings"] = int(round(a * 2 * math.pi * (high - 1.0)))
    return params


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"GGUF metadata {arch}.rope.scaling.type is {kind!r}; "
                             "supported: 'none', 'linear', 'yarn'")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor or 1.0)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        out["original_max_position_embeddings"] = int(orig)
    for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if meta.get(f"{arch}.rope.scaling.{src}") is not None:
            out[dst] = float(meta[f"{arch}.rope.scaling.{src}"])
    return out


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str],
                         rope_factors: np.ndarray | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"GGUF general.architecture is {arch!r}; Loong supports "
                             f"{sorted(_ARCHITECTURES)}")

    def get(key: str, default: Any = ModelLoadError) -> Any:
        value = meta.get(f"{arch}.{key}", None)
        if value is None:
            if default is ModelLoadError:
                raise ModelLoadError(f"GGUF metadata lacks '{arch}.{key}'")
            return default
        return value

    name = str(meta.get("general.name") or "").lower()
    architecture = "MistralForCausalLM" if arch == "llama" and "mistral" in name else _ARCHITECTURES[arch]
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv = get("attention.head_count_kv", heads)
    if isinstance(kv, list):  # some converters write one count per layer
        if len(set(kv)) != 1:
            raise ModelLoadError(f"GGUF {arch}.attention.head_count_kv varies by layer ({kv}); "
                                 "Loong needs one value")
        kv = kv[0]
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else int(get("vocab_size"))
    theta = float(get("rope.freq_base", 10000.0))
    scaling = _rope_scaling(meta, arch)
    if scaling is None and rope_factors is not None:
        scaling = _llama3_rope_from_factors(rope_factors, head_dim, theta)
    eos_ids = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads, num_kv_heads=int(kv),
        head_dim=head_dim, max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
        rope_scaling=scaling, tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names, architecture=architecture,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)))


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read one GGUF file: config, Hugging Face-named weights, tokenizer."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise ModelLoadError(f"cannot read GGUF file {path!r}: {e}") from None
    meta = read_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    factors = by_name.get("rope_freqs.weight")
    config = config_from_metadata(meta, set(by_name),
                                  tensor_to_torch(factors).numpy() if factors is not None else None)
    permute = meta["general.architecture"] in _PERMUTED
    weights: dict[str, torch.Tensor] = {}
    for gname, tensor in by_name.items():
        hf = hf_tensor_name(gname)
        if hf is None:
            continue
        w = tensor_to_torch(tensor)
        if permute and (".attn_q." in gname or ".attn_k." in gname):
            w = unpermute_qk(w, config.num_heads if ".attn_q." in gname else config.num_kv_heads)
        weights[hf] = w
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    return config, weights, tokenizer
