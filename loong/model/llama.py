"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

Owns: the layers (fused QKV with optional bias, RoPE, RMSNorm, SwiGLU MLP), loading
Hugging Face-named weights into them, and the LM head. Attention itself is not here:
each layer calls `attn(layer_idx, q, k, v)` supplied by the caller (rule 5 of DESIGN.md:
parallelism and KV paging live behind that interface, never in model code).

Decode steps run the layer loop natively (`loong.ops.decoder_layers`, the same kernels in the
same order, bitwise the same result) when the attention callable offers a native form
(`attn.native_decode()` -> `loong.ops.NativeAttention`, opaque here) and the kernels take the
inputs; `LlamaModel.native_decode = False` (or LOONG_EAGER_DECODE=1) keeps the Python loop.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loong import ops
from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.rope import RotaryEmbedding

# attn(layer_idx, q [T,H,D], k [T,Hkv,D], v [T,Hkv,D]) -> out [T,H,D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        self.input_norm = empty(h)
        self.qkv = empty(self.q_size + 2 * self.kv_size, h)
        self.qkv_bias = empty(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o_proj = empty(h, self.q_size)
        self.o_bias = empty(h) if cfg.o_proj_bias else None
        self.post_norm = empty(h)
        self.gate_up = empty(2 * cfg.intermediate_size, h)
        self.down = empty(h, cfg.intermediate_size)
        self.intermediate = cfg.intermediate_size

    def forward(self, idx: int, h: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attn: AttentionFn, next_norm: torch.Tensor) -> torch.Tensor:
        """h: this layer's normed input [T, hidden]; residual: the residual stream, updated in
        place. Returns the residual stream normed by `next_norm` (the next layer's input norm,
        or the final norm after the last layer)."""
        t = h.shape[0]
        qkv = ops.linear(h, self.qkv, self.qkv_bias)
        # Rotate q and k heads in one pass, in place: they are adjacent columns of qkv.
        ops.rotary_(qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        q = qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        o = attn(idx, q, k, v)
        o = ops.linear(o.reshape(t, self.q_size), self.o_proj, self.o_bias)
        h = ops.add_rms_norm(o, residual, self.post_norm, self.eps)
        mlp = ops.linear(ops.silu_mul(ops.linear(h, self.gate_up)), self.down)
        return ops.add_rms_norm(mlp, residual, next_norm, self.eps)


class LlamaModel(nn.Module):
    """Decoder stack plus LM head. `forward` returns final-norm hidden states [T, hidden]."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_positions: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        self.embed = empty(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = empty(cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else empty(cfg.vocab_size, cfg.hidden_size)
        self.to(device)
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, device)
        self.native_decode = os.environ.get("LOONG_EAGER_DECODE", "") != "1"
        self._native_weights: list[torch.Tensor] | None = None
        self._native_weights_ok = False

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                dynamic_rope_ranges: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        residual = F.embedding(input_ids, self.embed)   # a fresh tensor, updated in place
        cos, sin = self.rope.cos_sin(positions, dynamic_rope_ranges)
        n = len(self.layers)
        if n == 0:
            return ops.rms_norm(residual, self.norm, self.cfg.rms_norm_eps)
        h = ops.rms_norm(residual, self.layers[0].input_norm, self.cfg.rms_norm_eps)
        native = self._native_attention(attn)
        if native is not None:
            weights = self.native_layer_weights()
            if self._native_weights_ok and ops.decoder_layers_supported(h, cos, sin, native):
                cfg = self.cfg
                return ops.decoder_layers(h, residual, cos, sin, weights, cfg.num_heads,
                                          cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, native)
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_norm if i + 1 < n else self.norm
            h = layer(i, h, residual, cos, sin, attn, next_norm)
        return h

    def _native_attention(self, attn: AttentionFn):
        offer = getattr(attn, "native_decode", None) if self.native_decode else None
        return offer() if offer is not None else None

    def native_layer_weights(self) -> list[torch.Tensor]:
        """The layers' weights in `loong.ops.decoder_layers` order (8 per layer; the same
        tensors as the parameters, so in-place weight updates are seen)."""
        if self._native_weights is None:
            none = torch.empty(0, dtype=self.dtype, device=self.device)
            out: list[torch.Tensor] = []
            n = len(self.layers)
            for i, layer in enumerate(self.layers):
                nxt = self.layers[i + 1].input_norm if i + 1 < n else self.norm
                out += [layer.qkv, none if layer.qkv_bias is None else layer.qkv_bias,
                        layer.o_proj, none if layer.o_bias is None else layer.o_bias,
                        layer.post_norm, layer.gate_up, layer.down, nxt]
            self._native_weights = out
            self._native_weights_ok = ops.decoder_layer_weights_ok(out, self.dtype)
        return self._native_weights

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the selected hidden rows [N, hidden]."""
        head = self.embed if self.lm_head is None else self.lm_head
        return ops.linear(hidden, head).float()

    @torch.no_grad()
    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters (shape-checked)."""
        cfg = self.cfg
        used: set[str] = set()
        self._native_weights = None

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"checkpoint is missing weight {name!r}")
            used.add(name)
            return weights[name]

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if tuple(param.shape) != tuple(value.shape):
                raise ModelLoadError(
                    f"weight {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))

        put(self.embed, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm, take("model.norm.weight"), "model.norm.weight")
        if self.lm_head is not None:
            name = "lm_head.weight"
            put(self.lm_head, weights[name] if name in weights else take("model.embed_tokens.weight"), name)
            used.add(name)
        else:
            used.add("lm_head.weight")  # tied: a saved copy of the embedding is ignored
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            put(layer.input_norm, take(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(layer.post_norm, take(p + "post_attention_layernorm.weight"), p + "post_attention_layernorm.weight")
            qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            _check_rows(qkv, (layer.q_size, layer.kv_size, layer.kv_size), cfg.hidden_size, p + "self_attn")
            put(layer.qkv, torch.cat(qkv, 0), p + "self_attn.qkv_proj.weight")
            if layer.qkv_bias is not None:
                put(layer.qkv_bias, torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]),
                    p + "self_attn.qkv_proj.bias")
            put(layer.o_proj, take(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj.weight")
            if layer.o_bias is not None:
                put(layer.o_bias, take(p + "self_attn.o_proj.bias"), p + "self_attn.o_proj.bias")
            gu = [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
            _check_rows(gu, (cfg.intermediate_size,) * 2, cfg.hidden_size, p + "mlp")
            put(layer.gate_up, torch.cat(gu, 0), p + "mlp.gate_up_proj.weight")
            put(layer.down, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj.weight")
        unknown = [n for n in weights if n not in used and "rotary_emb" not in n]
        if unknown:
            raise ModelLoadError(f"checkpoint has {len(unknown)} unexpected weights, e.g. {unknown[:3]}")


def _check_rows(parts: list[torch.Tensor], rows: tuple[int, ...], cols: int, prefix: str) -> None:
    for t, r, n in zip(parts, rows, ("first", "second", "third")):
        if tuple(t.shape) != (r, cols):
            raise ModelLoadError(
                f"{prefix}: {n} projection has shape {tuple(t.shape)}, expected {(r, cols)}")
