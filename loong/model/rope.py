"""Rotary position embedding with the Hugging Face `rope_scaling` variants.

Owns: inverse frequencies for default, linear, dynamic NTK, YaRN and llama3 RoPE and the
cos/sin cache. `apply_rotary` (the rotation, rotate-half layout as Hugging Face checkpoints
store q/k) is re-exported from `loong.ops.torch_elementwise`, where it is also the fallback of
the C++ kernel `loong.ops.rotary_`.

Must not import: loong modules other than loong.model.config and loong.ops (torch otherwise).

Dynamic NTK depends on the sequence length. Hugging Face recomputes it from the longest
position in each forward call; we use, per sequence, the last position scheduled in the
step + 1. For an unchunked prefill and for decode steps this is the same number HF uses.
"""
from __future__ import annotations

import math

import torch

from loong.model.config import ModelConfig
from loong.ops.torch_elementwise import apply_rotary

__all__ = ["inv_freq_and_scale", "RotaryEmbedding", "apply_rotary"]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: int) -> torch.Tensor:
    factor = float(cfg.rope_scaling["factor"])
    dim = cfg.head_dim
    max_pos = cfg.max_position_embeddings
    seq_len = max(seq_len, max_pos)
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim)


def _yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    rs = cfg.rope_scaling
    dim = cfg.head_dim
    base = cfg.rope_theta
    orig = int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    factor = rs.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / orig
    factor = float(factor)

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn_factor = mscale_of(factor, m) / mscale_of(factor, m_all) if (m and m_all) else mscale_of(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attn_factor)


def _llama3_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    rs = cfg.rope_scaling
    inv = _base_inv_freq(cfg.rope_theta, cfg.head_dim)
    factor = float(rs["factor"])
    low_ff, high_ff = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Static inverse frequencies [head_dim/2] and the cos/sin multiplier."""
    kind = cfg.rope_type
    if kind in ("default", "dynamic"):
        return _base_inv_freq(cfg.rope_theta, cfg.head_dim), 1.0
    if kind == "linear":
        return _base_inv_freq(cfg.rope_theta, cfg.head_dim) / float(cfg.rope_scaling["factor"]), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg)
    if kind == "llama3":
        return _llama3_inv_freq(cfg), 1.0
    raise ValueError(f"unsupported rope_type {kind!r}")


class RotaryEmbedding:
    """cos/sin lookup by position; applies the rotation to q and k in place of a copy."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        inv_freq, self.scale = inv_freq_and_scale(cfg)
        self.dynamic = cfg.rope_type == "dynamic"
        self.cos, self.sin = self._table(inv_freq, torch.arange(max_positions, dtype=torch.float32))

    def _table(self, inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout
        cos = (emb.cos() * self.scale).to(device=self.device, dtype=self.dtype)
        sin = (emb.sin() * self.scale).to(device=self.device, dtype=self.dtype)
        return cos, sin

    def cos_sin(self, positions: torch.Tensor, seq_lens_for_dynamic: list[tuple[int, int, int]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] for flat `positions` [T].

        `seq_lens_for_dynamic`: (start, end, seq_len) token ranges of the flat batch; only
        read for dynamic NTK, where ranges with seq_len beyond the trained length get
        frequencies recomputed for that length.
        """
        cos, sin = self.cos[positions], self.sin[positions]
        if self.dynamic and seq_lens_for_dynamic:
            for start, end, seq_len in seq_lens_for_dynamic:
                if seq_len > self.cfg.max_position_embeddings:
                    inv = _dynamic_inv_freq(self.cfg, seq_len)
                    c, s = self._table(inv, positions[start:end].to("cpu", torch.float32))
                    cos[start:end], sin[start:end] = c, s
        return cos, sin

