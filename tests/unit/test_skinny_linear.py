"""The skinny linear kernel (csrc/cpu/skinny_linear.cpp via loong.ops.linear) against F.linear
and the fp32 reference on the same bf16 inputs: every shape class (rows 1-8, W row counts that
are and are not multiples of the kernel's 4-row block, K below, at and off multiples of 32),
bias, strided x, thread counts, and the fallbacks (more rows, other dtypes, no kernel)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loong import ops
from tests.linear_checks import assert_bf16_close, reference, spy_kernels

needs_kernel = pytest.mark.skipif(
    not ops.csrc_available() or not ops._get().linear_small_supported(),
    reason=f"skinny linear kernel unavailable: {ops.load_error() or 'no AVX512_BF16'}")


@pytest.fixture(autouse=True)
def no_packed_copies(monkeypatch):
    """From 2 rows `loong.ops.linear` prefers a packed copy (tests/unit/test_vnni_linear.py);
    without packing it runs the skinny kernel these tests are about."""
    monkeypatch.setenv("LOONG_PACK_WEIGHTS", "0")


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 37), (4, 32), (7, 64), (576, 576), (1729, 577),
                                 (2048, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_and_f_linear(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    y = ops.linear(x, w, b)
    ref = reference(x, w, b)
    assert_bf16_close(y, ref)
    # Same rounding as torch's bf16 GEMM except where the fp32 sums differ in the last bit.
    same = (y == F.linear(x, w, b)).float().mean().item()
    assert same > 0.97, same


@needs_kernel
def test_calls_the_kernel_for_small_bf16_batches(monkeypatch):
    calls = spy_kernels(monkeypatch, "linear_small")
    w = torch.randn(64, 32).bfloat16()
    for m in (1, 8, 9, 64):
        ops.linear(torch.randn(m, 32).bfloat16(), w)
    ops.linear(torch.randn(2, 32), w.float())                     # fp32: torch
    ops.linear(torch.randn(2, 32).bfloat16(), w.t().contiguous().t())   # strided w: torch
    assert calls == [("linear_small", 1), ("linear_small", 8)]


@needs_kernel
def test_strided_rows_and_views():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(6, 200, generator=g).bfloat16()
    x = big[1:5, 10:138]                   # row stride 200, last dim contiguous
    w = torch.randn(96, 128, generator=g).bfloat16()
    assert_bf16_close(ops.linear(x, w), reference(x, w, None))
    xt = torch.randn(128, 3, generator=g).bfloat16().t()     # last dim strided: torch path
    torch.testing.assert_close(ops.linear(xt, w), F.linear(xt, w))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_split_rows_exactly(threads):
    """W large enough to be split over threads: every output column is written, once."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        x = torch.randn(3, 576, generator=g).bfloat16()
        w = torch.randn(4099, 576, generator=g).bfloat16()     # 4.7 MB, N % 4 == 3
        b = torch.randn(4099, generator=g).bfloat16()
        assert_bf16_close(ops.linear(x, w, b), reference(x, w, b))
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_empty_k_gives_the_bias():
    x = torch.empty(2, 0, dtype=torch.bfloat16)
    w = torch.empty(5, 0, dtype=torch.bfloat16)
    b = torch.arange(5, dtype=torch.bfloat16)
    assert torch.equal(ops.linear(x, w, b), b.expand(2, 5))
    assert torch.equal(ops.linear(x, w), torch.zeros(2, 5, dtype=torch.bfloat16))


@needs_kernel
def test_kernel_rejects_bad_inputs_directly():
    ext = ops._get()
    w = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="rows"):
        ext.linear_small(torch.randn(9, 8).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="K=8"):
        ext.linear_small(torch.randn(1, 8).bfloat16(), torch.randn(4, 7).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.linear_small(torch.randn(1, 8), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        ext.linear_small(torch.randn(1, 8).bfloat16(), w, torch.randn(3).bfloat16())


def test_falls_back_to_f_linear_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_tried", True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, generator=g).bfloat16()
    w = torch.randn(24, 40, generator=g).bfloat16()
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    x32, w32 = x.float(), w.float()
    assert torch.equal(ops.linear(x32, w32), F.linear(x32, w32))
