"""`loong.ops.argmax_rows` (csrc/cpu/argmax.cpp) against `torch.argmax(dim=-1)`: random rows of
many widths (tails off the 16-lane vector), ties (lowest index wins, also across lanes and
chunks), NaN (the first NaN wins), infinities, strided rows, many rows (threaded), and the
inputs it hands to torch (bf16, a non-contiguous last dim, V = 0)."""
from __future__ import annotations

import pytest
import torch

from loong import ops

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")


def _check(x):
    got = ops.argmax_rows(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1)), (got, x.argmax(dim=-1))


@needs_ext
@pytest.mark.parametrize("v", [1, 2, 15, 16, 17, 31, 32, 33, 100, 1000, 49152, 49155])
def test_random_rows(v):
    g = torch.Generator().manual_seed(v)
    _check(torch.randn(5, v, generator=g))


@needs_ext
def test_ties_pick_the_lowest_index():
    x = torch.zeros(4, 100)
    _check(x)                                        # all equal -> 0
    x[0, [3, 19, 35, 99]] = 2.0                      # same lane, later chunks
    x[1, [40, 7]] = 5.0                              # different lanes
    x[2, [99, 98]] = 1.0                             # in the masked tail
    x[3] = float("-inf")                             # all -inf -> 0
    _check(x)
    y = torch.full((2, 64), -0.0)
    y[0, 10] = 0.0                                   # -0.0 == 0.0: first index
    y[1] = torch.tensor([1.0, 3.0] * 32)
    _check(y)


@needs_ext
def test_nan_and_infinities():
    x = torch.randn(6, 70)
    x[0, 50] = float("nan")
    x[1, 0] = float("nan")
    x[2, 69] = float("nan")
    x[3, [20, 60]] = float("nan")
    x[4, 33] = float("inf")
    x[5, :] = float("-inf")
    x[5, 68] = -1e30
    _check(x)


@needs_ext
def test_strided_and_many_rows():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(64, 4096 + 40, generator=g)
    _check(big[:, 7:4103])                           # row stride != V
    _check(torch.randn(300, 2000, generator=g))      # threaded over rows
    _check(torch.randn(0, 10))


def test_inputs_torch_runs():
    x = torch.randn(3, 40)
    assert torch.equal(ops.argmax_rows(x.bfloat16()), x.bfloat16().argmax(dim=-1))
    t = torch.randn(40, 3).t()                        # last dim not contiguous
    assert torch.equal(ops.argmax_rows(t), t.argmax(dim=-1))
    with pytest.raises((RuntimeError, IndexError)):
        ops.argmax_rows(torch.randn(2, 0))
