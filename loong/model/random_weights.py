"""Random Llama weights with a real tokenizer: models for measuring fixed costs and tests.

Owns: `random_model(tokenizer_from, ...)`, a `LoadedModel` of any shape with Hugging
Face-named random weights (norms near 1, projections scaled like an initialised network) and
the tokenizer, vocabulary and BOS/EOS ids of a real model. A 30-layer model with hidden size
64 costs almost no arithmetic per token, so its decode step time is the step's fixed cost
(dispatch, sampling, scheduling, the cluster's control plane).
Must not import: the model code (`llama.py`), sched/, kv/, worker/ (like `loader.py`).
"""
from __future__ import annotations

import torch

from loong.model.loader import LoadedModel


def random_model(tokenizer_from: LoadedModel, *, num_layers: int = 30, hidden_size: int = 64,
                 intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """A model of the given shape with random weights and `tokenizer_from`'s tokenizer,
    vocabulary, special ids and context length (untied LM head)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    base = tokenizer_from.config
    cfg = base.replace(hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=hidden_size // num_heads, tie_word_embeddings=False,
                       attention_bias=False, o_proj_bias=False, rope_scaling=None)
    g = torch.Generator().manual_seed(seed)

    def proj(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * cols ** -0.5).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(hidden_size, generator=g)).to(dtype)

    d, kv = cfg.head_dim, num_kv_heads * cfg.head_dim
    weights = {"model.embed_tokens.weight": proj(cfg.vocab_size, hidden_size),
               "model.norm.weight": norm(), "lm_head.weight": proj(cfg.vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": proj(num_heads * d, hidden_size),
            p + "self_attn.k_proj.weight": proj(kv, hidden_size),
            p + "self_attn.v_proj.weight": proj(kv, hidden_size),
            p + "self_attn.o_proj.weight": proj(hidden_size, num_heads * d),
            p + "mlp.gate_proj.weight": proj(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": proj(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": proj(hidden_size, intermediate_size),
        })
    return LoadedModel(cfg, weights, tokenizer_from.tokenizer,
                       dict(tokenizer_from.generation_config),
                       source=f"random {num_layers}x{hidden_size} (seed {seed})")
