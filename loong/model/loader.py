"""One entry point to get a model's files into memory (`load_model_files` -> `LoadedModel`).

Owns: resolving what the user named (nothing = embedded default, a `.gguf` file, a Hugging
Face directory, a directory with one `.gguf`), dispatching to the GGUF or HF reader, checking
that every expected tensor is present with the right shape, and merging BOS/EOS ids from
config, generation config and tokenizer.
Must not import transformers, the model code (`llama.py`) or anything under sched/, kv/,
worker/: callers build the network from the plain tensors returned here.
Nothing is ever downloaded.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.default_model import default_model_path
from loong.model.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model's config, Hugging Face-named weights and tokenizer, ready to build a network.

    Weight dtypes: float32 for F32 and dequantized GGUF tensors, the file's own float dtype
    otherwise (float16 / bfloat16 / float32). `lm_head.weight` is present only when untied.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def resolve_model_path(model: str | os.PathLike | None) -> tuple[str, str]:
    """(`"gguf"` or `"hf"`, absolute path) for what the user named."""
    if model is None:
        return "gguf", default_model_path()
    path = os.path.abspath(os.path.expanduser(os.fspath(model)))
    if not os.path.exists(path):
        raise ModelLoadError(
            f"model path {os.fspath(model)!r} does not exist (looked for {path!r}: a .gguf file, "
            "or a directory holding config.json or exactly one .gguf). Loong never downloads "
            "models: pass a local path, or no model to use the embedded default.")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf", path
        raise ModelLoadError(f"model file {path!r} is not a GGUF file (no 'GGUF' magic); pass a "
                             ".gguf file or a Hugging Face model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        names = [os.path.basename(g) for g in ggufs]
        raise ModelLoadError(f"directory {path!r} holds several .gguf files {names}; pass the "
                             "path of the one to load")
    raise ModelLoadError(f"directory {path!r} has no config.json and no .gguf file; it is "
                         "neither a Hugging Face model directory nor a GGUF model")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family decoder with `config` needs, Hugging Face names."""
    h, hd = config.hidden_size, config.head_dim
    q, kv, inter = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)})
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if getattr(config, "o_proj_bias", False):  # Llama's attention_bias covers o_proj too
            shapes[p + "self_attn.o_proj.bias"] = (h,)
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor],
                  source: str) -> dict[str, torch.Tensor]:
    """The expected tensors only (extras such as rotary caches dropped), or ModelLoadError
    naming the first missing tensor / shape mismatch."""
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in weights]
    if missing:
        hint = ""
        if any(k.endswith((".qweight", ".qzeros", ".scales")) for k in weights):
            hint = " (GPTQ/AWQ-quantized checkpoints are not supported; use a float or GGUF one)"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: missing weight '{missing[0]}'{more}{hint}")
    out = {}
    for name, shape in shapes.items():
        t = weights[name]
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"{source}: weight '{name}' has shape {tuple(t.shape)}, "
                                 f"expected {shape} from the model config")
        if not t.is_floating_point():
            raise ModelLoadError(f"{source}: weight '{name}' has dtype {t.dtype}; expected floats")
        out[name] = t
    return out


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _finish_config(config: ModelConfig, generation_config: dict[str, Any],
                   tokenizer: Tokenizer, source: str) -> ModelConfig:
    eos = [*config.eos_token_ids, *_ids(generation_config.get("eos_token_id")),
           *_ids(tokenizer.eos_token_id)]
    bos = config.bos_token_id
    if bos is None:
        bos = generation_config.get("bos_token_id", tokenizer.bos_token_id)
    bad = [i for i in eos if not 0 <= i < config.vocab_size]
    if bad:
        raise ModelLoadError(f"{source}: EOS token id(s) {bad} are outside the vocabulary "
                             f"(vocab_size {config.vocab_size})")
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"embedding only {config.vocab_size} rows")
    return config.replace(eos_token_ids=tuple(dict.fromkeys(eos)),
                          bos_token_id=None if bos is None else int(bos))


def load_model_files(model: str | os.PathLike | None = None) -> LoadedModel:
    """Load config, weights and tokenizer of `model` (None = the embedded default)."""
    kind, path = resolve_model_path(model)
    if kind == "gguf":
        from loong.model.gguf_loader import load_gguf

        config, weights, tokenizer = load_gguf(path)
        generation_config: dict[str, Any] = {}
    else:
        from loong.model.hf_loader import load_hf_dir

        config, weights, tokenizer, generation_config = load_hf_dir(path)
    weights = check_weights(config, weights, path)
    config = _finish_config(config, generation_config, tokenizer, path)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer,
                       generation_config=generation_config, source=path)
