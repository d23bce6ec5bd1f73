"""KV block pack / unpack (loong.ops kv_pack / kv_unpack_, csrc/cpu/kv_pack.cpp) against the
torch fallbacks in loong.kv.pack.

The kernel tests skip when the extension cannot be built; the fallback tests always run (with
LOONG_DISABLE_CSRC=1 the loong.ops entry points are the fallbacks themselves).
"""
from __future__ import annotations

import pytest
import torch

from loong import ops
from loong.kv.cache_pool import slots_for
from loong.kv.pack import kv_pack_torch, kv_unpack_torch_

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")

L, NB, BS, H, D = 2, 7, 4, 2, 8           # small cache: 28 slots
EXACT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (pack, unpack) pairs: the loong.ops entry points (C++ when built) and the torch fallbacks.
IMPLS = {"ops": (ops.kv_pack, ops.kv_unpack_), "torch": (kv_pack_torch, kv_unpack_torch_)}


def make_kv(dtype, g, nb=NB, bs=BS, h=H, d=D, layers=L):
    return torch.randn(layers, 2, nb, bs, h, d, generator=g).to(dtype)


def request_slots(g, nb=NB, bs=BS, n_tokens=13):
    """Slots of a request holding n_tokens (last block partial) in shuffled blocks, permuted."""
    blocks = torch.randperm(nb, generator=g)[:-(-n_tokens // bs)].tolist()
    slots = torch.tensor(slots_for(blocks, 0, n_tokens, bs), dtype=torch.long)
    return slots[torch.randperm(n_tokens, generator=g)]


def reference_pack(kv, slots):
    """packed[l, s, i] = kv[l, s].view(-1, H, D)[slots[i]], row by row."""
    Lk, _, nb, bs, h, d = kv.shape
    out = torch.empty(Lk, 2, len(slots), h, d, dtype=kv.dtype)
    for layer in range(Lk):
        for s in range(2):
            flat = kv[layer, s].reshape(nb * bs, h, d)
            for i, slot in enumerate(slots.tolist()):
                out[layer, s, i] = flat[slot]
    return out


def same_bytes(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class SpyExt:
    """Wraps the loaded extension and records which pack entry points ran."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def kv_pack(self, *a):
        self.calls.append("kv_pack")
        return self.ext.kv_pack(*a)

    def kv_unpack_(self, *a):
        self.calls.append("kv_unpack_")
        return self.ext.kv_unpack_(*a)


# ----------------------------------------------------------------- kernel parity
@needs_ext
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_pack_parity(dtype):
    g = torch.Generator().manual_seed(1)
    kv = make_kv(dtype, g)
    for slots in (request_slots(g), torch.randperm(NB * BS, generator=g),
                  torch.tensor([NB * BS - 1]), torch.tensor([0]),
                  torch.empty(0, dtype=torch.long)):
        out = ops.kv_pack(kv, slots)
        ref = kv_pack_torch(kv, slots)
        assert out.shape == (L, 2, len(slots), H, D) and out.dtype == dtype
        assert out.is_contiguous()
        assert torch.equal(out, ref)
        assert torch.equal(out, reference_pack(kv, slots))


@needs_ext
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_unpack_parity(dtype):
    g = torch.Generator().manual_seed(2)
    for slots in (request_slots(g), torch.tensor([5]), torch.empty(0, dtype=torch.long)):
        packed = torch.randn(L, 2, len(slots), H, D, generator=g).to(dtype)
        a = torch.zeros(L, 2, NB, BS, H, D, dtype=dtype)
        b = torch.zeros_like(a)
        assert ops.kv_unpack_(a, slots, packed) is None
        kv_unpack_torch_(b, slots, packed)
        assert torch.equal(a, b)


@needs_ext
def test_kernel_is_used_for_contiguous_and_int32_slots(monkeypatch):
    spy = SpyExt(ops._get())
    monkeypatch.setattr(ops, "_ext", spy)
    g = torch.Generator().manual_seed(3)
    kv = make_kv(torch.bfloat16, g)
    slots = request_slots(g)
    out = ops.kv_pack(kv, slots.to(torch.int32))
    assert torch.equal(out, kv_pack_torch(kv, slots))
    dst = torch.zeros_like(kv)
    ops.kv_unpack_(dst, slots[::2], out[:, :, ::2])       # strided slots and packed
    assert spy.calls == ["kv_pack", "kv_unpack_"]
    assert torch.equal(kv_pack_torch(dst, slots[::2]), out[:, :, ::2])


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_large_copy_thread_counts(threads):
    """Above the kernel's threading threshold (4 MiB cache, ~400 KiB moved)."""
    g = torch.Generator().manual_seed(4)
    kv = make_kv(torch.float32, g, nb=64, bs=16, h=4, d=64)
    slots = request_slots(g, nb=64, bs=16, n_tokens=101)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.kv_pack(kv, slots)
        dst = torch.zeros_like(kv)
        ops.kv_unpack_(dst, slots, out)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, kv_pack_torch(kv, slots))
    ref = torch.zeros_like(kv)
    kv_unpack_torch_(ref, slots, out)
    assert torch.equal(dst, ref)


# ----------------------------------------------------------------- round trips (both paths)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_into_zeroed_cache(impl, dtype):
    pack, unpack = IMPLS[impl]
    g = torch.Generator().manual_seed(5)
    src = make_kv(dtype, g)
    slots = request_slots(g)
    packed = pack(src, slots)
    dst = torch.zeros_like(src)
    unpack(dst, slots, packed)
    src_flat = src.view(L, 2, NB * BS, H, D)
    dst_flat = dst.view(L, 2, NB * BS, H, D)
    assert torch.equal(dst_flat[:, :, slots], src_flat[:, :, slots])
    others = torch.ones(NB * BS, dtype=torch.bool)
    others[slots] = False
    assert (dst_flat[:, :, others] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_unpack_then_pack_gives_identical_bytes(impl, dtype):
    """Migration: pack on one cache, unpack at other slots of a second cache, pack again.
    NaN, inf and -0.0 must survive bit for bit."""
    pack, unpack = IMPLS[impl]
    g = torch.Generator().manual_seed(6)
    src = make_kv(dtype, g)
    flat = src.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), -0.0, float("-inf")
    slots = torch.cat([torch.tensor([0]), request_slots(g)[1:]])     # slot 0 holds the specials
    packed = pack(src, slots)
    other = torch.randperm(NB * BS, generator=g)[:len(slots)]
    dst = make_kv(dtype, g)
    unpack(dst, other, packed)
    assert same_bytes(pack(dst, other), packed)
    assert same_bytes(packed, kv_pack_torch(src, slots))


# ----------------------------------------------------------------- errors (both paths)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_shapes_raise_value_error(impl):
    pack, unpack = IMPLS[impl]
    g = torch.Generator().manual_seed(7)
    kv = make_kv(torch.float32, g)
    slots = torch.tensor([3, 9, 1])
    packed = pack(kv, slots)
    with pytest.raises(ValueError, match="kv"):
        pack(kv[0], slots)                                      # 5-D
    with pytest.raises(ValueError, match="slots"):
        pack(kv, slots.view(1, 3))
    with pytest.raises(ValueError, match="slots"):
        pack(kv, slots.float())
    with pytest.raises(ValueError, match="packed"):
        unpack(kv, slots, packed[:, :, :2])                     # n mismatch
    with pytest.raises(ValueError, match="packed"):
        unpack(kv, slots, packed[..., :4])                      # head_dim mismatch
    with pytest.raises(ValueError, match="dtype"):
        unpack(kv, slots, packed.bfloat16())
    with pytest.raises(ValueError, match="slots"):
        unpack(kv, slots.view(3, 1), packed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_slot_raises_index_error(impl, dtype):
    pack, unpack = IMPLS[impl]
    g = torch.Generator().manual_seed(8)
    kv = make_kv(dtype, g)
    before = kv.clone()
    packed = pack(kv, torch.tensor([1, 2, 3]))
    for bad in (NB * BS, -1, 10 ** 9):
        slots = torch.tensor([1, bad, 3])
        with pytest.raises(IndexError, match=f"slot {bad}"):
            pack(kv, slots)
        with pytest.raises(IndexError, match=f"slot {bad}"):
            unpack(kv, slots, packed)
        assert torch.equal(kv, before)                          # nothing written


# ----------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("layout", ["slice", "permuted"])
def test_non_contiguous_kv_falls_back(layout, monkeypatch):
    """A strided cache (head_dim slice of a wider one, or a permuted storage where the block
    dims cannot be merged) runs the torch path, reads right and writes in place."""
    if ops.csrc_available():
        spy = SpyExt(ops._get())
        monkeypatch.setattr(ops, "_ext", spy)
    g = torch.Generator().manual_seed(9)
    if layout == "slice":
        kv = make_kv(torch.float32, g, d=2 * D)[..., :D]
    else:
        kv = torch.randn(NB, BS, L, 2, H, D, generator=g).permute(2, 3, 0, 1, 4, 5)
    assert not kv.is_contiguous() and kv.shape == (L, 2, NB, BS, H, D)
    slots = request_slots(g)
    out = ops.kv_pack(kv, slots)
    assert out.is_contiguous()
    assert torch.equal(out, reference_pack(kv, slots))
    assert torch.equal(out, kv_pack_torch(kv.contiguous(), slots))
    ops.kv_unpack_(kv, slots, torch.zeros_like(out))
    assert (ops.kv_pack(kv, slots) == 0).all()
    others = torch.ones(NB * BS, dtype=torch.bool)
    others[slots] = False
    kept = kv.contiguous().view(L, 2, NB * BS, H, D)[:, :, others]
    assert (kept != 0).all()                                  # other slots untouched
    if ops.csrc_available():
        assert spy.calls == []


def test_float64_and_int_dtypes_fall_back():
    """dtypes the kernel does not take still work (the torch path)."""
    g = torch.Generator().manual_seed(10)
    kv = make_kv(torch.float64, g)
    slots = request_slots(g)
    out = ops.kv_pack(kv, slots)
    assert torch.equal(out, reference_pack(kv, slots))
    dst = torch.zeros_like(kv)
    ops.kv_unpack_(dst, slots.to(torch.int16), out)
    assert torch.equal(ops.kv_pack(dst, slots), out)
