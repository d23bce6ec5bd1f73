"""C++ CPU kernels (loong.ops, csrc/cpu) against the torch fallbacks and the fp32 reference.

The kernel tests skip when the extension cannot be built (no compiler); on the dev host it must
build, and `test_extension_builds_here` says so when it does not.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from loong import ops
from loong.attention import cpu as acpu
from loong.attention.lse import merge_attention
from loong.attention.reference import attention_reference

NEG_INF = float("-inf")
HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 128)]
DTYPES = [torch.float32, torch.bfloat16]

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")


def tol(dtype):
    """(atol, rtol): the reference runs in fp32 on the same (rounded) inputs."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)


def close(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = tol(dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=atol, rtol=rtol)   # -inf must match


def make_paged(lens, Hkv, D, bs, dtype, g, extra_blocks=3):
    """Random paged cache with shuffled block ids; unused table entries hold garbage ids
    (valid ones) that must not be read. Returns caches, tables, lens and per-row kv."""
    nblks = [-(-n // bs) for n in lens]
    maxb = max(nblks + [1]) + 2
    num_blocks = sum(nblks) + extra_blocks
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.randint(0, num_blocks, (len(lens), maxb), generator=g, dtype=torch.int32)
    rows_kv = []
    for b, (n, nb) in enumerate(zip(lens, nblks)):
        ids = [perm.pop() for _ in range(nb)]
        if nb:
            tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor([ids[t // bs] * bs + t % bs for t in range(n)], dtype=torch.long)
        rows_kv.append((k_cache.view(-1, Hkv, D)[slots], v_cache.view(-1, Hkv, D)[slots]))
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), rows_kv


def check_rows(out, lse, q, rows_kv, scale, dtype):
    for b, (k, v) in enumerate(rows_kv):
        ro, rl = attention_reference(q[b:b + 1].float(), k.float(), v.float(), scale)
        close(out[b:b + 1], lse[b:b + 1], ro, rl, dtype)
        if k.shape[0] == 0:
            assert torch.isneginf(lse[b]).all() and (out[b] == 0).all()


# ----------------------------------------------------------------- build / dispatch
def test_extension_builds_here():
    """The dev host has a compiler: the extension must build (a failure here is a real bug)."""
    assert ops.csrc_available(), ops.load_error()
    info = ops.build_info()
    assert info.startswith("loong_cpu_ops:")


@needs_ext
def test_cpu_backend_dispatches_to_kernel(monkeypatch):
    calls = []
    real = ops.paged_decode_attention

    def spy(*a):
        calls.append(a[0].shape)
        return real(*a)
    monkeypatch.setattr(ops, "paged_decode_attention", spy)
    g = torch.Generator().manual_seed(0)
    kc, vc, tables, cl, rows_kv = make_paged([5, 0, 40], 3, 64, 16, torch.float32, g)
    q = torch.randn(3, 9, 64, generator=g)
    out, lse = acpu.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    assert calls == [q.shape]
    check_rows(out, lse, q, rows_kv, 0.125, torch.float32)


def test_fallback_when_build_fails(monkeypatch):
    """A failed build warns once and every entry point falls back to torch."""
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_tried", False)
    monkeypatch.setattr(ops, "_error", None)
    monkeypatch.delenv("LOONG_DISABLE_CSRC", raising=False)

    def boom():
        raise RuntimeError("no compiler")
    monkeypatch.setattr(ops, "_load", boom)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert not ops.csrc_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no second warning
        assert not ops.csrc_available()
        g = torch.Generator().manual_seed(1)
        kc, vc, tables, cl, rows_kv = make_paged([7, 0, 33], 3, 64, 4, torch.float32, g)
        q = torch.randn(3, 9, 64, generator=g)
        out, lse = acpu.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
        check_rows(out, lse, q, rows_kv, 0.125, torch.float32)
        oa, ob = torch.randn(4, 8), torch.randn(4, 8)
        la, lb = torch.randn(4), torch.randn(4)
        for x, y in zip(ops.lse_merge(oa, la, ob, lb), merge_attention(oa, la, ob, lb)):
            assert torch.equal(x, y)
    assert "no compiler" in ops.load_error()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_tried", False)
    monkeypatch.setattr(ops, "_error", None)
    monkeypatch.setenv("LOONG_DISABLE_CSRC", "1")
    monkeypatch.setattr(ops, "_load", lambda: pytest.fail("must not build when disabled"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops.csrc_available()
    assert "LOONG_DISABLE_CSRC" in ops.load_error()


# ----------------------------------------------------------------- paged decode parity
@needs_ext
@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
def test_paged_decode_parity(bs, dtype, H, Hkv, D):
    """Lengths 0, 1, odd, tile edges and a long row (split into several tasks)."""
    g = torch.Generator().manual_seed(100 + bs)
    lens = [0, 1, 17, 15, 16, 33, 255, 5000]
    kc, vc, tables, cl, rows_kv = make_paged(lens, Hkv, D, bs, dtype, g)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    scale = D ** -0.5
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, cl, scale)
    check_rows(out, lse, q, rows_kv, scale, dtype)
    t_out, t_lse = acpu.paged_decode_attention_torch(q, kc, vc, tables, cl, scale)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(out.float(), t_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, t_lse, atol=atol, rtol=rtol)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 33])
def test_paged_decode_batches(dtype, B):
    """B=1 with a long context (split-K across threads) and B=33 with random lengths."""
    g = torch.Generator().manual_seed(200 + B)
    rng = random.Random(B)
    lens = [5000] if B == 1 else [rng.choice([0, 1, rng.randint(2, 700)]) for _ in range(B)]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 3, 64, 16, dtype, g)
    q = torch.randn(B, 9, 64, generator=g).to(dtype)
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    check_rows(out, lse, q, rows_kv, 0.125, dtype)
    t_out, t_lse = acpu.paged_decode_attention_torch(q, kc, vc, tables, cl, 0.125)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(out.float(), t_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, t_lse, atol=atol, rtol=rtol)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_paged_decode_thread_counts(threads):
    """Any thread count (and so any split of the rows into tasks) gives the same result."""
    g = torch.Generator().manual_seed(300)
    lens = [3000, 1, 0, 900, 64]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 3, 64, 16, torch.float32, g)
    q = torch.randn(len(lens), 9, 64, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = ops.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    finally:
        torch.set_num_threads(old)
    check_rows(out, lse, q, rows_kv, 0.125, torch.float32)


@needs_ext
def test_paged_decode_strided_q_and_int64_metadata():
    """q as a view of a fused qkv projection; int64 tables / lengths are converted."""
    g = torch.Generator().manual_seed(400)
    lens = [40, 0, 129]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 3, 64, 4, torch.float32, g)
    qkv = torch.randn(3, (9 + 6) * 64, generator=g)
    q = qkv[:, :9 * 64].view(3, 9, 64)
    assert not q.is_contiguous()
    out, lse = ops.paged_decode_attention(q, kc, vc, tables.long(), cl.long(), 0.125)
    check_rows(out, lse, q, rows_kv, 0.125, torch.float32)
    qt = torch.randn(3, 64, 9, generator=g).transpose(1, 2)      # D not the fastest dim
    out, lse = ops.paged_decode_attention(qt, kc, vc, tables, cl, 0.125)
    check_rows(out, lse, qt, rows_kv, 0.125, torch.float32)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_scalar_path_head_dim(dtype):
    """A head size without a SIMD specialisation (D=48) runs the scalar code."""
    g = torch.Generator().manual_seed(500)
    lens = [0, 1, 77, 300]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 2, 48, 16, dtype, g)
    q = torch.randn(len(lens), 6, 48, generator=g).to(dtype)
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, cl, 48 ** -0.5)
    check_rows(out, lse, q, rows_kv, 48 ** -0.5, dtype)


@needs_ext
def test_paged_decode_extreme_scores():
    """Large logits (online softmax must rescale, not overflow) and an all-equal row."""
    g = torch.Generator().manual_seed(600)
    lens = [100, 300]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 1, 32, 16, torch.float32, g)
    q = torch.randn(2, 2, 32, generator=g) * 40
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, cl, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_rows(out, lse, q, rows_kv, 1.0, torch.float32)
    q0 = torch.zeros(2, 2, 32)
    out, lse = ops.paged_decode_attention(q0, kc, vc, tables, cl, 1.0)
    check_rows(out, lse, q0, rows_kv, 1.0, torch.float32)


@needs_ext
def test_paged_decode_empty_and_errors():
    g = torch.Generator().manual_seed(700)
    kc, vc, tables, cl, _ = make_paged([5, 9], 3, 64, 4, torch.float32, g)
    q = torch.randn(2, 9, 64, generator=g)
    out, lse = ops.paged_decode_attention(q[:0], kc, vc, tables[:0], cl[:0], 0.1)
    assert out.shape == (0, 9, 64) and lse.shape == (0, 9)
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, torch.zeros(2, dtype=torch.int32),
                                          0.1)
    assert torch.isneginf(lse).all() and (out == 0).all()
    too_long = torch.tensor([5, 4 * tables.shape[1] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="blocks"):
        ops.paged_decode_attention(q, kc, vc, tables, too_long, 0.1)
    bad = tables.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(IndexError, match="block id"):
        ops.paged_decode_attention(q, kc, vc, bad, cl, 0.1)
    with pytest.raises(ValueError):
        ops.paged_decode_attention(torch.randn(2, 8, 64), kc, vc, tables, cl, 0.1)   # 8 % 3
    with pytest.raises(ValueError):
        ops.paged_decode_attention(q, kc, vc, tables[:1], cl, 0.1)


@needs_ext
def test_unsupported_inputs_fall_back_to_torch():
    """fp32 q with a bf16 cache, or a non-contiguous cache, take the torch path unchanged."""
    g = torch.Generator().manual_seed(800)
    kc, vc, tables, cl, rows_kv = make_paged([30, 2], 3, 64, 16, torch.float32, g)
    q = torch.randn(2, 9, 64, generator=g)
    kcs = torch.cat([kc, kc], dim=-1)[..., :64]        # strided view, same values
    assert not kcs.is_contiguous()
    out, lse = ops.paged_decode_attention(q, kcs, vc, tables, cl, 0.125)
    check_rows(out, lse, q, rows_kv, 0.125, torch.float32)


# ----------------------------------------------------------------- lse merge parity
def _partials(shape, dtype, g):
    oa, ob = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    la, lb = torch.randn(*shape[:-1], generator=g) * 3, torch.randn(*shape[:-1], generator=g) * 3
    flat_la, flat_lb = la.view(-1), lb.view(-1)
    n = flat_la.numel()
    oa.view(n, -1)[0] = 0
    flat_la[0] = NEG_INF                       # a empty
    if n > 1:
        ob.view(n, -1)[1] = 0
        flat_lb[1] = NEG_INF                   # b empty
    if n > 2:
        oa.view(n, -1)[2] = ob.view(n, -1)[2] = 0
        flat_la[2] = flat_lb[2] = NEG_INF      # both empty
    if n > 3:
        flat_la[3], flat_lb[3] = 1e4, 1e4 - 3  # large values must not overflow
    return oa.to(dtype), la, ob.to(dtype), lb


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (2, 3, 4, 8), (33, 9, 64), (5, 4, 128)])
def test_lse_merge_parity(dtype, shape):
    g = torch.Generator().manual_seed(900 + len(shape))
    oa, la, ob, lb = _partials(shape, dtype, g)
    out, lse = ops.lse_merge(oa, la, ob, lb)
    r_out, r_lse = merge_attention(oa, la, ob, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), r_out.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(lse, r_lse, atol=1e-6, rtol=1e-6)
    flat = lse.view(-1)
    assert torch.isneginf(flat[2]).all() if flat.numel() > 2 else True
    if flat.numel() > 2:
        assert (out.view(flat.numel(), -1)[2] == 0).all()


@needs_ext
def test_lse_merge_is_exact_decomposition():
    """Merging paged-decode partials over two key halves equals decode over all keys."""
    g = torch.Generator().manual_seed(950)
    kc, vc, tables, cl, rows_kv = make_paged([300], 3, 64, 16, torch.float32, g)
    q = torch.randn(1, 9, 64, generator=g)
    k, v = rows_kv[0]
    ro, rl = attention_reference(q, k, v, 0.125)
    a = acpu.full_attention(q, k[:111], v[:111], 0.125)
    b = acpu.full_attention(q, k[111:], v[111:], 0.125)
    out, lse = ops.lse_merge(a[0], a[1], b[0], b[1])
    close(out, lse, ro, rl, torch.float32)


@needs_ext
def test_lse_merge_fallback_inputs_and_errors():
    g = torch.Generator().manual_seed(960)
    oa, la, ob, lb = _partials((3, 4, 8), torch.float32, g)
    # mixed dtypes and strided inputs: same answers as the torch merge
    out, lse = ops.lse_merge(oa.bfloat16(), la, ob, lb)
    r_out, r_lse = merge_attention(oa.bfloat16(), la, ob, lb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), r_out.float())
    oat = oa.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse = ops.lse_merge(oat, la, ob, lb)
    torch.testing.assert_close(out, merge_attention(oa, la, ob, lb)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        ops.lse_merge(oa, la[..., :2], ob, lb)
    with pytest.raises(ValueError):
        ops.lse_merge(oa, la, ob[:2], lb[:2])
