"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

Owns: the layers (fused QKV with optional bias, RoPE, RMSNorm, SwiGLU MLP), loading
Hugging Face-named weights into them, and the LM head. Attention itself is not here:
each layer calls `attn(layer_idx, q, k, v)` supplied by the caller (rule 5 of DESIGN.md:
parallelism and KV paging live behind that interface, never in model code).

Decode steps run the layer loop natively (`loong.ops.decoder_layers`, the same kernels in the
same order, bitwise the same result) when the attention callable offers a native form
(`attn.native_decode()` -> `loong.ops.NativeAttention`, opaque here) and the kernels take the
inputs; `LlamaModel.native_decode = False` (or LOONG_EAGER_DECODE=1) keeps the Python loop.
`quantize_q8_0` rounds the projections to Q8_0 and keeps their 8-bit blocks, which decode steps
of 1-8 rows stream (weight_dtype="q8_0").
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loong import ops
from loong.ops import quantized_weights
from loong.errors import InvalidRequestError, ModelLoadError
from loong.model.config import ModelConfig
from loong.model.weight_names import EMBED, LM_HEAD, check_weight_update, hf_weight_shapes
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
        self.weight_format = "auto"          # "q8_0" after quantize_q8_0()
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

    def projections(self) -> list[torch.Tensor]:
        """The matrices a token multiplies: every layer's qkv, o_proj, gate_up and down, and
        the LM head (the embedding, for a tied model)."""
        head = self.embed if self.lm_head is None else self.lm_head
        return [w for layer in self.layers
                for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)] + [head]

    @torch.no_grad()
    def quantize_q8_0(self) -> int:
        """Round every projection to Q8_0 in place and keep its 8-bit blocks beside it
        (`loong.ops.quantized_weights`): decode steps of 1-8 rows then stream the blocks.
        Later in-place weight updates through `update_hf_weights` are rounded again. Returns
        how many matrices were rounded now (those whose width is not a multiple of 32 stay
        as they are)."""
        self.weight_format = "q8_0"
        return self._requantize()

    def _requantize(self) -> int:
        n = 0
        for w in self.projections():
            if quantized_weights.q8_form(w) is None and quantized_weights.quantize_(w):
                n += 1
        return n

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the selected hidden rows [N, hidden]."""
        head = self.embed if self.lm_head is None else self.lm_head
        return ops.linear(hidden, head).float()

    def hf_weight_slots(self) -> dict[str, torch.Tensor]:
        """Every weight by its Hugging Face name (as `weight_names.hf_weight_shapes` lists
        them) -> the parameter, or the rows of a fused one (q/k/v in `qkv`, gate/up in
        `gate_up`), that holds it: views, so copying into one updates the model in place."""
        slots: dict[str, torch.Tensor] = {EMBED: self.embed, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            slots[LM_HEAD] = self.lm_head
        inter = self.cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, kv = layer.q_size, layer.kv_size
            slots[p + "input_layernorm.weight"] = layer.input_norm
            slots[p + "post_attention_layernorm.weight"] = layer.post_norm
            for n, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                slots[p + f"self_attn.{n}_proj.weight"] = layer.qkv[a:b]
                if layer.qkv_bias is not None:
                    slots[p + f"self_attn.{n}_proj.bias"] = layer.qkv_bias[a:b]
            slots[p + "self_attn.o_proj.weight"] = layer.o_proj
            if layer.o_bias is not None:
                slots[p + "self_attn.o_proj.bias"] = layer.o_bias
            slots[p + "mlp.gate_proj.weight"] = layer.gate_up[:inter]
            slots[p + "mlp.up_proj.weight"] = layer.gate_up[inter:]
            slots[p + "mlp.down_proj.weight"] = layer.down
        return slots

    @torch.no_grad()
    def update_hf_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy Hugging Face-named tensors (any subset of the weights) into the parameters
        that hold them, in place (cast to the model's dtype and device). Every name and shape
        is checked before anything is copied (InvalidRequestError naming the weight); a
        tied model's `lm_head.weight` is its embedding; rotary buffers are ignored. Returns
        the number of tensors copied."""
        pairs = check_weight_update(self.cfg, named)
        slots = self.hf_weight_slots()
        for name, value in pairs:
            slots[name].copy_(value.to(device=self.device, dtype=self.dtype))
        if self.weight_format == "q8_0":
            self._requantize()          # the matrices just written (their forms went stale)
        return len(pairs)

    @torch.no_grad()
    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Fill every parameter from a whole Hugging Face-named checkpoint (shape-checked).
        An untied model whose checkpoint has no `lm_head.weight` uses the embedding; a tied
        model ignores a saved copy of it."""
        cfg = self.cfg
        self._native_weights = None
        given = {n: t for n, t in weights.items() if "rotary_emb" not in n}
        if cfg.tie_word_embeddings:
            given.pop(LM_HEAD, None)
        elif LM_HEAD not in given and EMBED in given:
            given[LM_HEAD] = given[EMBED]
        shapes = hf_weight_shapes(cfg)
        missing = [n for n in shapes if n not in given]
        if missing:
            raise ModelLoadError(f"checkpoint is missing weight {missing[0]!r}")
        unknown = [n for n in given if n not in shapes]
        if unknown:
            raise ModelLoadError(f"checkpoint has {len(unknown)} unexpected weights, e.g. {unknown[:3]}")
        try:
            self.update_hf_weights(given.items())
        except InvalidRequestError as e:
            raise ModelLoadError(str(e).split(": ", 1)[-1]) from None
