"""Tiny model checkpoints written on the fly for tests (no downloads, a few MB at most).

Owns: `write_tiny_hf_checkpoint` (a random Llama/Qwen2 saved by transformers as safetensors,
with a tokenizer.json), `write_tiny_gguf` (a random llama/qwen2 GGUF with chosen quant types)
and `tiny_byte_tokenizer_metadata` (a 262-token byte-level vocabulary with ChatML specials).
Imports transformers and gguf lazily: they are test-only dependencies.

Tokenizer choice for HF checkpoints (`tokenizer=`):
  "smollm2" (default): the embedded SmolLM2 tokenizer (49152 ids, ChatML template), written
      out through our `Tokenizer.save_pretrained`; vocab_size defaults to 49152 to match.
  "bytes": the tiny byte-level vocabulary below; vocab_size defaults to 262 (its size).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def tiny_byte_tokenizer_metadata() -> dict[str, Any]:
    """GGUF-style tokenizer metadata: 3 control tokens (ids 0-2), 256 byte tokens, 3 merges."""
    from loong.model.tokenizer import byte_alphabet

    byte_tokens = [byte_alphabet()[b] for b in range(256)]
    merged = ["".join(m) for m in BYTE_MERGES]
    tokens = BYTE_SPECIALS + byte_tokens + merged
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * len(BYTE_SPECIALS) + [1] * (len(tokens) - 3),
            "tokenizer.ggml.merges": [" ".join(m) for m in BYTE_MERGES],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHATML_TEMPLATE}


@functools.lru_cache(maxsize=2)
def _tokenizer(kind: str):
    from loong.model.tokenizer import Tokenizer

    if kind == "bytes":
        return Tokenizer.from_gguf_metadata(tiny_byte_tokenizer_metadata())
    if kind == "smollm2":
        import gguf

        from loong.model.default_model import default_model_path
        from loong.model.gguf_loader import read_metadata

        meta = read_metadata(gguf.GGUFReader(default_model_path()))
        return Tokenizer.from_gguf_metadata(meta)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'smollm2' or 'bytes'")


def write_tiny_hf_checkpoint(path: str | os.PathLike, *, model_type: str = "llama",
                             tokenizer: str = "smollm2", dtype: Any = None, seed: int = 0,
                             max_shard_size: str | int | None = None, norm_noise: float = 0.1,
                             **overrides: Any) -> Path:
    """Write a tiny random `LlamaForCausalLM` (or `Qwen2ForCausalLM`, with q/k/v biases) into
    `path` with safetensors weights, config.json, generation_config.json and tokenizer files.

    `overrides` go to the transformers config (e.g. num_key_value_heads=1, tie_word_embeddings=True,
    rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=32, attention_bias=True).
    Norm weights get 1 + norm_noise * N(0, 1) so that tests notice a skipped norm.
    `max_shard_size` (e.g. "200KB") makes transformers write shards plus an index.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(tokenizer)
    cfg: dict[str, Any] = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                               tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, initializer_range=0.05)
    cfg.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if model_type not in classes:
        raise ValueError(f"model_type must be one of {sorted(classes)}")
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + norm_noise * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    if dtype is not None:
        model = model.to(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tok.save_pretrained(path)
    return path


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (HF rotate-half -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _kquant_bytes(rng: np.random.Generator, shape: tuple[int, int], qtype) -> np.ndarray:
    """Random bytes for a K-quant tensor; every byte < 0x3C keeps the fp16 scales finite."""
    import gguf

    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return rng.integers(0, 0x3C, size=byte_shape, dtype=np.uint8)


def write_tiny_gguf(path: str | os.PathLike, *, arch: str = "llama",
                    qtypes: dict[str, str] | None = None, default_qtype: str = "F32",
                    hidden: int = 64, intermediate: int = 256, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, tied: bool = False, rope_scaling: dict | None = None,
                    seed: int = 0) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write a tiny random GGUF; return (path, expected, original), HF-named float32 arrays:
    `expected` is gguf's own dequantization of the stored data (what a loader must return),
    `original` the random weights before quantization (absent for K-quant tensors).

    `qtypes` maps HF tensor names to a GGMLQuantizationType name (default `default_qtype`).
    K-quant types (Q2_K ... Q6_K) get random bytes since gguf cannot quantize to them.
    Q/K are permuted the way
    llama.cpp's converter does for arch "llama".
    """
    import gguf

    from loong.model.gguf_loader import hf_tensor_name

    rng = np.random.default_rng(seed)
    meta = tiny_byte_tokenizer_metadata()
    vocab, head_dim = len(meta["tokenizer.ggml.tokens"]), hidden // heads
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        writer.add_rope_scaling_factor(rope_scaling["factor"])
        if "original_context_length" in rope_scaling:
            writer.add_rope_scaling_orig_ctx_len(rope_scaling["original_context_length"])
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(meta["tokenizer.chat_template"])

    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                       p + "attn_q.weight": (heads * head_dim, hidden),
                       p + "attn_k.weight": (kv_heads * head_dim, hidden),
                       p + "attn_v.weight": (kv_heads * head_dim, hidden),
                       p + "attn_output.weight": (hidden, heads * head_dim),
                       p + "ffn_gate.weight": (intermediate, hidden),
                       p + "ffn_up.weight": (intermediate, hidden),
                       p + "ffn_down.weight": (hidden, intermediate)})
        if arch == "qwen2":
            shapes.update({p + "attn_q.bias": (heads * head_dim,),
                           p + "attn_k.bias": (kv_heads * head_dim,),
                           p + "attn_v.bias": (kv_heads * head_dim,)})
    expected: dict[str, np.ndarray] = {}
    original: dict[str, np.ndarray] = {}
    for gname, shape in shapes.items():
        hf = hf_tensor_name(gname)
        is_norm = gname.endswith("norm.weight")
        qname = "F32" if is_norm or len(shape) == 1 else (qtypes or {}).get(hf, default_qtype)
        qtype = gguf.GGMLQuantizationType[qname]
        n_head = heads if ".attn_q." in gname else kv_heads
        permute = arch == "llama" and (".attn_q." in gname or ".attn_k." in gname)
        if qname.endswith("_K"):
            stored = _kquant_bytes(rng, shape, qtype)
        else:
            w = (1.0 + 0.1 * rng.standard_normal(shape) if is_norm
                 else 0.2 * rng.standard_normal(shape)).astype(np.float32)
            original[hf] = w
            stored = _permute_for_gguf(w, n_head) if permute else w
            if qname != "F32":
                stored = gguf.quants.quantize(stored, qtype)
        if qname in ("F32", "F16"):
            writer.add_tensor(gname, stored)
        else:
            writer.add_tensor(gname, stored, raw_dtype=qtype)
        ref = gguf.quants.dequantize(stored, qtype).reshape(shape).astype(np.float32)
        if permute:  # HF layout = the inverse of the converter's row permutation
            ref = ref[np.argsort(_permute_for_gguf(np.arange(shape[0]), n_head))]
        expected[hf] = ref
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path), expected, original


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
