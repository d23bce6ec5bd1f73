"""The Hugging Face names and shapes of a Llama-family model's weights, from its config alone.

Owns: `hf_weight_shapes(cfg)` (every weight the model holds, as a Hugging Face Llama / Qwen2
checkpoint names it, with its shape) and `check_weight_update(cfg, named)` (a set of named
tensors that may replace some of them: every name known, every shape right), so the manager
can check a weight update before anything is sent to an instance, with no model in memory.
Names that carry no weight here (`rotary_emb` buffers) are accepted and ignored; with tied
embeddings `lm_head.weight` names the embedding.
Must not import: torch-heavy model code (`llama.py`), sched/, kv/, worker/.
"""
from __future__ import annotations

from typing import Iterable

from loong.errors import InvalidRequestError
from loong.model.config import ModelConfig

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model by its Hugging Face name, with its shape (`lm_head.weight`
    only when the embeddings are untied)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    out: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for n, rows in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{n}_proj.weight"] = (rows, h)
            if cfg.attention_bias:
                out[p + f"self_attn.{n}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.o_proj_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    return out


def canonical_name(cfg: ModelConfig, name: str) -> str | None:
    """The model's name for a checkpoint name: itself, the embedding for a tied
    `lm_head.weight`, or None for names that carry no weight here (rotary buffers)."""
    if "rotary_emb" in name:
        return None
    if name == LM_HEAD and cfg.tie_word_embeddings:
        return EMBED
    return name


def check_weight_update(cfg: ModelConfig, named: Iterable[tuple[str, object]],
                        field: str = "weights") -> list[tuple[str, object]]:
    """The (model name, tensor) pairs of an update, checked: a name the model does not have
    or a wrong shape raises InvalidRequestError naming the weight (nothing is applied then).
    Tensors are anything with a `shape`."""
    shapes = hf_weight_shapes(cfg)
    out: list[tuple[str, object]] = []
    for name, tensor in named:
        if not isinstance(name, str):
            raise InvalidRequestError(field, f"weight names must be strings, got {name!r}")
        key = canonical_name(cfg, name)
        if key is None:
            continue
        if key not in shapes:
            raise InvalidRequestError(field, f"the model has no weight {name!r} (Hugging Face "
                                      f"Llama names, e.g. 'model.layers.0.mlp.up_proj.weight')")
        shape = tuple(getattr(tensor, "shape", ()))
        if shape != shapes[key]:
            raise InvalidRequestError(field, f"weight {name!r} has shape {shape}, expected "
                                      f"{shapes[key]}")
        out.append((key, tensor))
    return out
