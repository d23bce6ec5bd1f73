"""Packed weights (loong.ops.packed_weights) behind `loong.ops.linear` for more than
SKINNY_MAX_ROWS bf16 rows: F.linear's results on the plain weight (bitwise on oneDNN's layout,
within one bf16 rounding on our vnni layout, whose kernel tests/unit/test_vnni_linear.py
covers), one packed copy per weight, re-packed after an in-place update (through the parameter
or a view of it), dropped with the weight, and never made where it is off, over budget or not
applicable."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from loong import ops
from loong.ops import packed_weights as pw
from tests.linear_checks import fresh_packed_copies  # noqa: F401

needs_pack = pytest.mark.skipif(not pw._probe(), reason="this torch cannot pack oneDNN weights")


@pytest.fixture(autouse=True)
def _fresh(fresh_packed_copies):
    yield


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(torch.bfloat16)


@needs_pack
@pytest.mark.parametrize("m", [9, 33, 64, 200])
@pytest.mark.parametrize("n,k", [(96, 64), (160, 96), (1000, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(m, n, k, bias):
    w = _w(n, k)
    b = _w(1, n, seed=1)[0] if bias else None
    x = _w(m, k, seed=2)
    got = ops.linear(x, w, b)
    copy = pw.packed(w)
    assert copy is not None
    want = F.linear(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    if copy.is_mkldnn:
        assert torch.equal(got, want)              # the same oneDNN GEMM, weight pre-reordered
    else:                                          # our kernel: fp32 sums in its own order
        assert (got == want).float().mean().item() > 0.95
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=5e-2)


@needs_pack
@pytest.mark.parametrize("m", [9, 64])
def test_onednn_layout_is_bitwise_f_linear(m):
    """Without the native module's kernel the copy is oneDNN's own layout: F.linear bit for bit."""
    w, b, x = _w(160, 96), _w(1, 160, seed=1)[0], _w(m, 96, seed=2)
    copy = pw.packed(w, None)
    assert copy.is_mkldnn
    assert torch.equal(pw.linear_packed(x, w, copy, b), F.linear(x, w, b))


@needs_pack
def test_strided_rows_and_one_copy_per_weight():
    w = _w(128, 64)
    x = _w(20, 200)[:, 10:74]                      # last dim contiguous, rows strided
    y1 = ops.linear(x, w)
    first = pw.packed(w)
    y2 = ops.linear(x.contiguous(), w)
    assert pw.packed(w) is first                   # cached, not re-packed
    assert torch.equal(y1, y2)
    assert pw.held_bytes() == w.numel() * 2


@needs_pack
def test_in_place_update_through_a_view_repacks():
    """The stale-copy bug this guards against: a weight updated in place (RL weight sync
    copies into views of fused parameters) must not keep answering with the old values."""
    w = torch.nn.Parameter(_w(64, 32), requires_grad=False)
    x = _w(16, 32, seed=3)
    before = ops.linear(x, w)
    with torch.no_grad():
        w[10:20].mul_(-3.0)                         # through a view: the version is shared
    after = ops.linear(x, w)
    assert not torch.equal(before, after)
    assert torch.equal(after, ops.linear(x, w.detach().clone()))
    assert torch.allclose(after.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)
    assert pw.held_bytes() == w.numel() * 2        # the old copy went (and the dead clone's)


@needs_pack
def test_a_dead_weight_gives_its_memory_back():
    w = _w(256, 64)
    ops.linear(_w(12, 64), w)
    assert pw.held_bytes() == w.numel() * 2
    del w
    gc.collect()
    assert pw.held_bytes() == 0


def test_not_packed_where_off_over_budget_or_not_applicable(monkeypatch):
    x = _w(12, 64)
    w = _w(32, 64)
    monkeypatch.setenv("LOONG_PACK_WEIGHTS", "0")
    assert pw.packed(w) is None
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    monkeypatch.setenv("LOONG_PACK_WEIGHTS", "1")
    monkeypatch.setenv("LOONG_PACK_WEIGHTS_MAX_GB", "0")
    assert pw.packed(w) is None
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    monkeypatch.setenv("LOONG_PACK_WEIGHTS_MAX_GB", "not a number")
    assert pw.budget_bytes() == 4 << 30
    monkeypatch.delenv("LOONG_PACK_WEIGHTS_MAX_GB")
    assert pw.packed(w.float()) is None                        # fp32: F.linear
    assert pw.packed(_w(64, 32).t()) is None                   # not contiguous
    assert pw.packed(torch.zeros(4, dtype=torch.bfloat16)) is None
    with torch.inference_mode():
        inf = _w(32, 64)
    assert pw.packed(inf) is None                              # no version counter
    assert torch.equal(ops.linear(x, inf), F.linear(x, inf))
    assert pw.held_bytes() == 0


def test_one_row_never_packs_and_two_to_eight_only_for_our_kernel():
    """A step of 1 row runs the skinny kernel on the plain weight (no copy made); 2-8 rows
    take the packed copy only where it is our layout (oneDNN's is no faster than the skinny
    kernel there)."""
    w = _w(64, 32)
    ops.linear(_w(1, 32), w)
    assert pw.held_bytes() == 0
    ours = pw.native_packs(ops._get())
    for m in range(2, ops.SKINNY_MAX_ROWS + 1):
        y = ops.linear(_w(m, 32, seed=m), w)
        ref = F.linear(_w(m, 32, seed=m).float(), w.float())
        assert torch.allclose(y.float(), ref, rtol=2e-2, atol=5e-2)
    assert pw.held_bytes() == (w.numel() * 2 if ours else 0)
