"""Fused elementwise kernels (loong.ops rms_norm / add_rms_norm / rotary_ / silu_mul,
csrc/cpu/fused_elementwise.cpp) against their torch fallbacks.

The kernel tests skip when the extension cannot be built; the fallback tests always run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loong import ops
from loong.model.rope import apply_rotary

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")

DTYPES = [torch.float32, torch.bfloat16]
TOKENS = [1, 7, 64, 2048]


def assert_parity(out, ref, dtype):
    """fp32: tight. bf16: almost all elements identical, the rest a rounding flip apart: a
    value rounded twice (normalised then times weight; silu then times up) can differ by two
    bf16 ulps (relative 2^-6) when fp32 noise flips the first rounding."""
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=2 ** -6)
        assert (out != ref).float().mean().item() < 0.01


def hf_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def strided_rows(t, h, dtype, g):
    """[t, h] with a row stride larger than h (a column slice of a wider matrix)."""
    return (torch.randn(t, h + 40, generator=g) * 2).to(dtype)[:, 17:17 + h]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("h", [576, 100])
def test_rms_norm(dtype, t, h):
    g = torch.Generator().manual_seed(t + h)
    w = (torch.rand(h, generator=g) + 0.5).to(dtype)
    for x in (torch.randn(t, h, generator=g).to(dtype) * 3, strided_rows(t, h, dtype, g)):
        out = ops.rms_norm(x, w, 1e-5)
        assert_parity(out, ops.rms_norm_torch(x, w, 1e-5), dtype)
        assert_parity(out, hf_rms_norm(x, w, 1e-5), dtype)
        if dtype == torch.float32:
            assert_parity(out, F.rms_norm(x, (h,), w, 1e-5), dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("h", [576, 100])
def test_add_rms_norm(dtype, t, h):
    g = torch.Generator().manual_seed(7 * t + h)
    w = (torch.rand(h, generator=g) + 0.5).to(dtype)
    x = strided_rows(t, h, dtype, g)
    residual = torch.randn(t, h, generator=g).to(dtype) * 4
    ref_res = residual.clone()
    ref = (ref_res.add_(x), ops.rms_norm_torch(ref_res, w, 1e-6))[1]
    out = ops.add_rms_norm(x, residual, w, 1e-6)
    # The residual update is exact (one add, one rounding) in both dtypes.
    assert torch.equal(residual, ref_res)
    assert_parity(out, ref, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("heads,d", [(9 + 3, 64), (4, 32), (3, 40)])
def test_rotary_strided_qk_view(dtype, t, heads, d):
    """The layout of the model: q and k heads as a [T, heads, D] view of qkv columns."""
    g = torch.Generator().manual_seed(t * heads + d)
    qkv = torch.randn(t, (heads + 2) * d, generator=g).to(dtype)
    x = qkv[:, :heads * d].view(t, heads, d)
    ang = torch.rand(t, d // 2, generator=g) * 100
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    ref = apply_rotary(x, cos, sin)
    untouched = qkv[:, heads * d:].clone()
    out = ops.rotary_(x, cos, sin)
    assert out.data_ptr() == x.data_ptr()
    assert_parity(x, ref, dtype)
    assert torch.equal(qkv[:, heads * d:], untouched)   # v columns are not written


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_general_cos_sin(dtype):
    """cos/sin halves that differ (not a rotate-half table) and a head stride > D."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(7, 5, 80, generator=g).to(dtype)
    x = base[:, :, 8:72]
    cos, sin = torch.randn(7, 64, generator=g).to(dtype), torch.randn(7, 64, generator=g).to(dtype)
    ref = apply_rotary(x, cos, sin)
    ops.rotary_(x, cos, sin)
    assert_parity(x, ref, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("inter", [1536, 40])
def test_silu_mul(dtype, t, inter):
    g = torch.Generator().manual_seed(t + inter)
    gu = (torch.randn(t, 2 * inter + 24, generator=g) * 4).to(dtype)[:, 8:8 + 2 * inter]
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = ops.silu_mul(gu)
    assert_parity(out, ref, dtype)


@needs_ext
def test_silu_mul_extremes():
    gu = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("inf"),
                        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = ops.silu_mul(gu)
    ref = F.silu(gu[:, :8]) * gu[:, 8:]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_fallbacks_match_reference_semantics():
    """The torch paths taken for unsupported inputs (here float64 / 3-D) keep the contract."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    w = torch.rand(16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5))
    res = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    want_res = res + x
    out = ops.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(res, want_res)
    torch.testing.assert_close(out, hf_rms_norm(want_res, w, 1e-5))
    cos, sin = torch.randn(2, 16, generator=g, dtype=torch.float64), torch.randn(
        2, 16, generator=g, dtype=torch.float64)
    ref = apply_rotary(x, cos, sin)
    ops.rotary_(x, cos, sin)
    torch.testing.assert_close(x, ref)
    gu = torch.randn(4, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.silu_mul(gu), F.silu(gu[:, :5]) * gu[:, 5:])
