"""The batched bf16 linear on vnni-packed weights (csrc/cpu/vnni_linear.cpp) against the fp32
reference and F.linear on the same bf16 inputs: the packed layout itself, every tile shape (rows
around the 8-row tile and the L2 row block, column counts around the 16-column block and the
48-column panel, odd K), bias, strided x, 1 and 2 threads, exact sums bit for bit, and the routes
that take it (loong.ops.linear from PACKED_MIN_ROWS rows up, the native decode step)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loong import ops
from loong.ops import packed_weights as pw
from tests.linear_checks import (assert_bf16_close, fresh_packed_copies,  # noqa: F401
                                 reference, spy_kernels)

needs_kernel = pytest.mark.skipif(
    not ops.csrc_available() or not ops._get().linear_vnni_supported(),
    reason=f"vnni linear kernel unavailable: {ops.load_error() or 'no AVX512_BF16'}")


@pytest.fixture(autouse=True)
def _fresh(fresh_packed_copies):
    yield


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 1), (16, 2), (37, 9), (48, 64), (49, 63), (96, 576),
                                 (1000, 72)])
def test_pack_layout(n, k):
    """Element (n, k) of W sits where the kernel's contract says (panels of 3 blocks of 16)."""
    ext = ops._get()
    w = _rand((n, k), n + k)
    p = ext.vnni_pack(w)
    nb, k2 = (n + 15) // 16, (k + 1) // 2
    assert p.shape == (nb * k2 * 32,) and p.numel() == ext.vnni_packed_numel(n, k)
    want = torch.zeros(nb * k2 * 32, dtype=torch.bfloat16)
    for row in range(n):
        b, c = divmod(row, 16)
        b0 = b // 3 * 3
        nr = min(3, nb - b0)
        for col in range(k):
            want[b0 * k2 * 32 + ((col // 2) * nr + (b - b0)) * 32 + c * 2 + col % 2] = w[row, col]
    assert torch.equal(p, want)


@needs_kernel
@pytest.mark.parametrize("m", [1, 7, 8, 9, 16, 17, 33, 64, 200, 300])
@pytest.mark.parametrize("n,k", [(16, 32), (37, 9), (49, 63), (96, 576), (1000, 72),
                                 (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(m, n, k, bias):
    ext = ops._get()
    x = _rand((m, k), m * 7 + k)
    w = _rand((n, k), n * 3 + k)
    b = _rand((n,), n) if bias else None
    y = ext.linear_vnni(x, ext.vnni_pack(w), n, b)
    ref = reference(x, w, b)
    assert_bf16_close(y, ref)
    same = (y == F.linear(x, w, b)).float().mean().item()
    assert same > 0.95, same


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_sums_are_bitwise_and_threads_agree(threads):
    """Small integers: every product and partial sum is exact in fp32, so any summing order
    gives the same bf16, and the kernel must equal F.linear bit for bit; rows past one L2 block
    (K = 1536 -> 128 rows per pass) and every panel width are covered."""
    ext = ops._get()
    g = torch.Generator().manual_seed(5)
    m, n, k = 270, 1000, 1536
    x = torch.randint(-3, 4, (m, k), generator=g).bfloat16()
    w = torch.randint(-3, 4, (n, k), generator=g).bfloat16()
    b = torch.randint(-8, 9, (n,), generator=g).bfloat16()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ext.linear_vnni(x, ext.vnni_pack(w), n, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).bfloat16())


@needs_kernel
def test_strided_rows_odd_k_reads_nothing_past_a_row():
    """x rows with a stride (a view of a wider tensor) and an odd K: the last pair takes x's
    last element only; a NaN just past each row must not leak into y."""
    ext = ops._get()
    wide = _rand((20, 80), 1)
    wide[:, 41] = float("nan")
    x = wide[:, :41]                       # K = 41, stride 80, NaN right after each row
    w = _rand((50, 41), 2)
    y = ext.linear_vnni(x, ext.vnni_pack(w), 50, None)
    assert not torch.isnan(y).any()
    assert_bf16_close(y, reference(x, w, None))


@needs_kernel
def test_bad_arguments_are_named():
    ext = ops._get()
    w = _rand((32, 64), 0)
    p = ext.vnni_pack(w)
    with pytest.raises(RuntimeError, match="packed must be vnni_pack"):
        ext.linear_vnni(_rand((9, 64), 1), p, 48, None)          # wrong N
    with pytest.raises(RuntimeError, match="packed must be vnni_pack"):
        ext.linear_vnni(_rand((9, 62), 1), p, 32, None)          # wrong K
    with pytest.raises(RuntimeError, match="bias"):
        ext.linear_vnni(_rand((9, 64), 1), p, 32, _rand((31,), 2))
    with pytest.raises(RuntimeError, match="x must be"):
        ext.linear_vnni(_rand((9, 64), 1).float(), p, 32, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.vnni_pack(w.t())


@needs_kernel
def test_ops_linear_routes_batches_to_it(monkeypatch):
    """More than SKINNY_MAX_ROWS bf16 rows run the kernel on the weight's cached packed copy;
    x with a non-contiguous last dim runs F.linear instead."""
    calls = spy_kernels(monkeypatch, "linear_vnni")
    w = _rand((64, 32), 3)
    x = _rand((12, 32), 4)
    y = ops.linear(x, w)
    assert calls == [("linear_vnni", 12)]
    assert pw.held_bytes() == w.numel() * 2
    assert_bf16_close(y, reference(x, w, None))
    cols = _rand((32, 12), 5).t()                  # [12, 32] with stride (1, 12)
    assert torch.equal(ops.linear(cols, w), F.linear(cols, w))
    assert calls == [("linear_vnni", 12)]


@needs_kernel
def test_two_to_eight_rows_take_the_packed_copy_unless_q8_blocks(monkeypatch):
    """From PACKED_MIN_ROWS rows the packed copy streams at the read bandwidth where the skinny
    kernel does not; one row keeps the skinny kernel (no copy needed); a weight with Q8_0
    blocks keeps its Q8_0 kernel at 1-8 rows."""
    from loong.ops import quantized_weights as qw
    calls = spy_kernels(monkeypatch, "linear_vnni", "linear_small", "linear_q8")
    w = _rand((64, 64), 3)
    for m in (1, 2, 8):
        x = _rand((m, 64), m)
        assert_bf16_close(ops.linear(x, w), reference(x, w, None))
    assert calls == [("linear_small", 1), ("linear_vnni", 2), ("linear_vnni", 8)]
    q = torch.nn.Parameter(_rand((64, 64), 4), requires_grad=False)
    assert qw.quantize_(q)
    calls.clear()
    for m in (1, 2, 8):
        ops.linear(_rand((m, 64), m), q)
    assert calls == [("linear_q8", 1), ("linear_q8", 2), ("linear_q8", 8)]
