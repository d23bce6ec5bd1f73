"""Shared checks of the linear kernels' tests (skinny, vnni, packed copies): the fp32
reference, the bf16 closeness bound, a clean packed-copy cache, and a spy on which native
kernel `loong.ops` calls."""
from __future__ import annotations

import pytest
import torch

from loong import ops
from loong.ops import packed_weights


def reference(x, w, b):
    """x w^T (+ b) in fp32 on the same bf16 inputs."""
    y = x.float() @ w.float().T
    return y + b.float() if b is not None else y


def assert_bf16_close(y, ref):
    """Within one bf16 rounding of the fp32 result, plus fp32 summation-order noise."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-3 * (1 + ref.abs().max())
    assert bool((err <= bound).all()), (f"max err {err.max().item()} "
                                        f"(|ref| max {ref.abs().max().item()})")


@pytest.fixture
def fresh_packed_copies(monkeypatch):
    """Packing on with the default budget, no copies before or after the test."""
    monkeypatch.delenv("LOONG_PACK_WEIGHTS", raising=False)
    monkeypatch.delenv("LOONG_PACK_WEIGHTS_MAX_GB", raising=False)
    packed_weights.clear()
    yield
    packed_weights.clear()


def spy_kernels(monkeypatch, *names: str) -> list:
    """Record (kernel name, rows of its first argument) for every call `loong.ops` makes to
    the named native functions; returns the list the calls are appended to."""
    calls: list = []
    ext = ops._get()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            if name not in names:
                return fn

            def called(*a, **kw):
                calls.append((name, a[0].shape[0]))
                return fn(*a, **kw)
            return called

    spy = Spy()
    monkeypatch.setattr(ops, "_get", lambda: spy)
    return calls
