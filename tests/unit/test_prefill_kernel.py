"""C++ prefill attention kernel (loong.ops.causal_attention / full_attention,
csrc/cpu/prefill_attention.cpp) against the fp32 reference and the torch (flash op) path.

Kernel tests skip when the extension cannot be built or does not handle the dtype (a build
without AVX-512 / AVX512_BF16); the dispatch and fallback tests always run.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from loong import ops
from loong.attention import cpu as acpu
from loong.attention.reference import attention_reference

HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 128)]
LENGTHS = [1, 2, 15, 16, 17, 63, 64, 65, 200, 1000]
DTYPES = [torch.float32, torch.bfloat16]


def kernel_runs(dtype, D=64):
    if not ops.csrc_available():
        return False
    x = torch.empty(1, 1, D, dtype=dtype)
    return ops.prefill_kernel_supports(x, x, x)


def needs_kernel(dtype, D=64):
    return pytest.mark.skipif(not kernel_runs(dtype, D),
                              reason=f"prefill kernel unavailable for {dtype} D={D}: "
                                     f"{ops.load_error()}")


def tol(dtype):
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)


def close(out, lse, ref_out, ref_lse, dtype, atol=None, rtol=None):
    a, r = tol(dtype)
    atol, rtol = atol or a, rtol or r
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert out.is_contiguous() and lse.is_contiguous()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=atol, rtol=rtol)


def rand_qkv(L, H, Hkv, D, dtype, seed=0, Lk=None):
    g = torch.Generator().manual_seed(seed)
    Lk = L if Lk is None else Lk
    q = torch.randn(L, H, D, generator=g).to(dtype)
    k = torch.randn(Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Lk, Hkv, D, generator=g).to(dtype)
    return q, k, v


def causal_ref(q, k, v, scale):
    pos = torch.arange(q.shape[0])
    return attention_reference(q, k, v, scale, pos, pos)


def kernel_causal(q, k, v, scale):
    assert ops.prefill_kernel_supports(q, k, v)
    return ops.causal_attention(q, k, v, scale)


# ----------------------------------------------------------------- causal parity
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
@pytest.mark.parametrize("L", LENGTHS)
def test_causal_parity(dtype, H, Hkv, D, L):
    if not kernel_runs(dtype, D):
        pytest.skip("prefill kernel unavailable")
    q, k, v = rand_qkv(L, H, Hkv, D, dtype, seed=L)
    scale = D ** -0.5
    out, lse = kernel_causal(q, k, v, scale)
    ro, rl = causal_ref(q, k, v, scale)
    close(out, lse, ro, rl, dtype)
    to, tl = acpu.causal_attention_torch(q, k, v, scale)
    close(out, lse, to, tl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (2, 1, 256)])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 700), (3, 5), (17, 64), (65, 130), (200, 33),
                                   (64, 1000)])
def test_full_parity(dtype, H, Hkv, D, Lq, Lk):
    if not kernel_runs(dtype, D):
        pytest.skip("prefill kernel unavailable")
    q, k, v = rand_qkv(Lq, H, Hkv, D, dtype, seed=Lq * 7 + Lk, Lk=Lk)
    scale = D ** -0.5
    ro, rl = attention_reference(q, k, v, scale)
    to, tl = acpu.full_attention_torch(q, k, v, scale)
    # the kernel itself (ops.full_attention sends fewer than FULL_KERNEL_MIN_LQ queries to torch)
    out, lse = ops._get().prefill_attention(q, k, v, scale, False)
    close(out, lse, ro, rl, dtype)
    close(out, lse, to, tl, dtype)
    out, lse = ops.full_attention(q, k, v, scale)
    close(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    """The engine passes views: q, k, v slices of a fused qkv buffer, and k a head slice of a
    rotated [L, H + Hkv, D] tensor."""
    if not kernel_runs(dtype):
        pytest.skip("prefill kernel unavailable")
    L, H, Hkv, D = 200, 9, 3, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(L, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q = qkv[:, :H * D].view(L, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(L, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(L, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    scale = D ** -0.5
    out, lse = kernel_causal(q, k, v, scale)
    close(out, lse, *causal_ref(q, k, v, scale), dtype)
    rot = torch.randn(L, H + Hkv, D, generator=g).to(dtype)
    q2, k2 = rot[:, :H], rot[:, H:]
    out, lse = kernel_causal(q2, k2, v, scale)
    close(out, lse, *causal_ref(q2, k2, v, scale), dtype)
    # non-unit innermost stride too
    qt = torch.randn(L, D, H, generator=g).to(dtype).transpose(1, 2)
    out, lse = kernel_causal(qt, k2, v, scale)
    close(out, lse, *causal_ref(qt, k2, v, scale), dtype)
    out, lse = ops.full_attention(q[:17], k, v, scale)
    close(out, lse, *attention_reference(q[:17], k, v, scale), dtype)
    out, lse = ops._get().prefill_attention(q[:5], k, v, scale, False)
    close(out, lse, *attention_reference(q[:5], k, v, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(dtype, threads):
    if not kernel_runs(dtype):
        pytest.skip("prefill kernel unavailable")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = rand_qkv(333, 9, 3, 64, dtype, seed=11)
        out, lse = kernel_causal(q, k, v, 0.125)
        close(out, lse, *causal_ref(q, k, v, 0.125), dtype)
        out2, lse2 = kernel_causal(q, k, v, 0.125)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)   # deterministic
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_scores(dtype):
    """Large score ranges (online-softmax rescaling across key blocks) stay finite."""
    if not kernel_runs(dtype):
        pytest.skip("prefill kernel unavailable")
    q, k, v = rand_qkv(300, 9, 3, 64, dtype, seed=5)
    q = (q.float() * 8).to(dtype)
    k = k.float()
    k[250:] *= 6            # late keys dominate: the running max jumps in a later block
    k = k.to(dtype)
    out, lse = kernel_causal(q, k, v, 0.125)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    a, r = tol(dtype)
    ro, rl = causal_ref(q, k, v, 0.125)
    torch.testing.assert_close(out.float(), ro.float(), atol=a, rtol=r)
    torch.testing.assert_close(lse, rl, atol=a * 10, rtol=r)   # lse values are large here


# ----------------------------------------------------------------- empty / dispatch / fallback
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype):
    q, k, v = rand_qkv(0, 9, 3, 64, dtype)
    for fn in (acpu.causal_attention, ops.causal_attention):
        out, lse = fn(q, k, v, 0.125)
        assert out.shape == (0, 9, 64) and lse.shape == (0, 9) and out.dtype == dtype
    q1 = torch.randn(4, 9, 64).to(dtype)
    out, lse = acpu.full_attention(q1, k, v, 0.125)
    assert (out == 0).all() and torch.isneginf(lse).all() and out.shape == q1.shape
    out, lse = acpu.full_attention(q, k[:0], v[:0], 0.125)
    assert out.shape == (0, 9, 64)


def test_bad_shapes_raise():
    q, k, v = rand_qkv(5, 9, 3, 64, torch.float32)
    with pytest.raises(ValueError):
        acpu.causal_attention(q[:4], k, v, 0.1)
    with pytest.raises(ValueError):
        acpu.causal_attention(q[:, :8], k, v, 0.1)
    with pytest.raises(ValueError):
        ops.full_attention(q, k, v[:, :, :32], 0.1)


def spy_prefill_kernel(monkeypatch, record):
    """Wrap the extension so each prefill kernel call appends record(args) to the list returned."""
    calls = []
    ext = ops._get()

    class Spy:
        def __getattr__(self, name):
            return getattr(ext, name)

        def prefill_attention(self, *args):
            calls.append(record(args))
            return ext.prefill_attention(*args)
    monkeypatch.setattr(ops, "_ext", Spy())
    return calls


@needs_kernel(torch.bfloat16)
def test_backend_dispatches_to_kernel(monkeypatch):
    calls = spy_prefill_kernel(monkeypatch, lambda args: args[4])  # causal flag
    q, k, v = rand_qkv(20, 9, 3, 64, torch.bfloat16)
    acpu.causal_attention(q, k, v, 0.125)
    acpu.full_attention(q, k, v, 0.125)
    acpu.chunk_prefill_attention(q, k, v, k, v, 0.125)
    assert calls == [True, False, False, True] or calls == [True, False, True, False]


def test_unsupported_inputs_fall_back():
    """fp16, an odd head size and mixed dtypes take the torch path with the same results."""
    for dtype, D in ((torch.float16, 64), (torch.float32, 48)):
        q, k, v = rand_qkv(33, 4, 2, D, dtype)
        assert not ops.prefill_kernel_supports(q, k, v)
        out, lse = acpu.causal_attention(q, k, v, 0.2)
        to, tl = acpu.causal_attention_torch(q, k, v, 0.2)
        assert torch.equal(out, to) and torch.equal(lse, tl)
    q, k, v = rand_qkv(33, 4, 2, 64, torch.float32)
    assert not ops.prefill_kernel_supports(q, k.bfloat16(), v)


def test_fallback_when_build_fails(monkeypatch):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_tried", True)
    monkeypatch.setattr(ops, "_error", "no compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, k, v = rand_qkv(40, 9, 3, 64, torch.float32)
        out, lse = acpu.causal_attention(q, k, v, 0.125)
        to, tl = acpu.causal_attention_torch(q, k, v, 0.125)
        assert torch.equal(out, to) and torch.equal(lse, tl)
        out, lse = acpu.full_attention(q, k, v, 0.125)
        to, tl = acpu.full_attention_torch(q, k, v, 0.125)
        assert torch.equal(out, to) and torch.equal(lse, tl)
        out, lse = ops.causal_attention(q, k, v, 0.125)
        assert torch.equal(out, acpu.causal_attention_torch(q, k, v, 0.125)[0])


@needs_kernel(torch.bfloat16)
def test_full_small_lq_goes_to_torch(monkeypatch):
    calls = spy_prefill_kernel(monkeypatch, lambda args: args[0].shape[0])  # query rows
    q, k, v = rand_qkv(ops.FULL_KERNEL_MIN_LQ, 9, 3, 64, torch.bfloat16, Lk=100)
    ops.full_attention(q[:ops.FULL_KERNEL_MIN_LQ - 1], k, v, 0.125)
    assert calls == []
    ops.full_attention(q, k, v, 0.125)
    assert calls == [ops.FULL_KERNEL_MIN_LQ]
