"""The trainer's differentiable copy of the model: a plain-PyTorch Llama forward over
Hugging Face-named parameters (the serving model uses inference-only kernels; this one has
autograd), so the trainer can compute log-probabilities of sampled tokens and their
gradients, then push the changed tensors to Loong by the same names.

Owns: `TrainLlama` (from a `LoadedModel`; `forward(ids) -> logits`, causal, right-padded
batches; `token_logprobs(ids, start, lengths)`; `trainable(last_layers)` freezes the rest;
`named_trainable()` yields (Hugging Face name, tensor) for `WeightSender.broadcast`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _key(name: str) -> str:
    return name.replace(".", "__")


class TrainLlama(nn.Module):
    def __init__(self, loaded, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        cfg = loaded.config
        self.cfg = cfg
        self.params = nn.ParameterDict({_key(n): nn.Parameter(t.detach().to(dtype).clone())
                                        for n, t in loaded.weights.items()
                                        if "rotary_emb" not in n})
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv, persistent=False)

    def w(self, name: str) -> torch.Tensor:
        return self.params[_key(name)]

    def trainable(self, last_layers: int) -> None:
        """Train the last `last_layers` decoder layers and the final norm; freeze the rest
        (the embedding too: it is tied to the LM head here)."""
        first = self.cfg.num_layers - last_layers
        for key, p in self.params.items():
            name = key.replace("__", ".")
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            p.requires_grad_(name == "model.norm.weight" or (layer is not None and layer >= first))

    def named_trainable(self):
        for key, p in self.params.items():
            if p.requires_grad:
                yield key.replace("__", "."), p.detach()

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + self.cfg.rms_norm_eps)).to(x.dtype) * w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (right-padded) -> logits [B, T, V] (fp32)."""
        cfg = self.cfg
        b, t = ids.shape
        h, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(ids, self.w("model.embed_tokens.weight"))
        pos = torch.arange(t, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)

        def rope(z):                                          # [B, heads, T, D]
            z1, z2 = z[..., : d // 2], z[..., d // 2:]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            y = self._norm(x, self.w(p + "input_layernorm.weight"))
            q = F.linear(y, self.w(p + "self_attn.q_proj.weight")).view(b, t, h, d).transpose(1, 2)
            k = F.linear(y, self.w(p + "self_attn.k_proj.weight")).view(b, t, hk, d).transpose(1, 2)
            v = F.linear(y, self.w(p + "self_attn.v_proj.weight")).view(b, t, hk, d).transpose(1, 2)
            q, k = rope(q), rope(k)
            k = k.repeat_interleave(h // hk, dim=1)
            v = v.repeat_interleave(h // hk, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, h * d), self.w(p + "self_attn.o_proj.weight"))
            y = self._norm(x, self.w(p + "post_attention_layernorm.weight"))
            g = F.linear(y, self.w(p + "mlp.gate_proj.weight"))
            u = F.linear(y, self.w(p + "mlp.up_proj.weight"))
            x = x + F.linear(F.silu(g) * u, self.w(p + "mlp.down_proj.weight"))
        x = self._norm(x, self.w("model.norm.weight"))
        head = self.w("lm_head.weight") if _key("lm_head.weight") in self.params \
            else self.w("model.embed_tokens.weight")
        return F.linear(x, head).float()

    def token_logprobs(self, ids: torch.Tensor, starts: list[int], lengths: list[int]
                       ) -> list[torch.Tensor]:
        """Per row, log p(ids[t] | ids[:t]) for t in [starts[r], starts[r] + lengths[r])."""
        logp = self.forward(ids).log_softmax(-1)
        out = []
        for r, (s, n) in enumerate(zip(starts, lengths)):
            tgt = ids[r, s:s + n]
            out.append(logp[r, s - 1:s - 1 + n].gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
        return out
