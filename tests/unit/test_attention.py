"""Attention kernels and the lse merge against the naive fp32 reference (loong.attention)."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

from loong.attention import get_attention_backend
from loong.attention import cpu as acpu
from loong.attention.lse import merge_attention, merge_attention_many
from loong.attention.reference import attention_reference
from loong.ops import torch_attention

HEADS = [(9, 3, 64), (4, 4, 32)]        # (H, Hkv, D): SmolLM2 GQA shape and plain MHA
DTYPES = [torch.float32, torch.bfloat16]
NEG_INF = float("-inf")


def tol(dtype):
    """(atol, rtol) for out and lse; reference runs in fp32 on the same (rounded) inputs."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)


def rnd(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(dtype)


def close(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = tol(dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    # -inf must match exactly (assert_close treats equal infinities as equal)
    torch.testing.assert_close(lse, ref_lse.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------- the CPU op we build on
def test_cpu_flash_op_facts():
    """Pin what cpu.py relies on: natural-log lse with scale, [B, H, L] fp32, top-left causal."""
    g = torch.Generator().manual_seed(0)
    q, k, v = rnd(1, 2, 3, 8, g=g), rnd(1, 2, 5, 8, g=g), rnd(1, 2, 5, 8, g=g)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q, k, v, 0.0, True, scale=0.3)
    s = (q @ k.transpose(-1, -2)) * 0.3
    s = s.masked_fill(~torch.ones(3, 5, dtype=torch.bool).tril(), NEG_INF)
    assert lse.shape == (1, 2, 3) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- reference
def test_reference_matches_torch_sdpa_and_masks():
    g = torch.Generator().manual_seed(1)
    q, k, v = rnd(6, 9, 16, g=g), rnd(8, 3, 16, g=g), rnd(8, 3, 16, g=g)
    out, lse = attention_reference(q, k, v, 0.25)
    exp = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, exp.transpose(0, 1), atol=1e-5, rtol=1e-5)
    # positions: query at position -1 sees nothing -> out 0, lse -inf
    qp = torch.tensor([-1, 0, 3, 7, 7, 100])
    kp = torch.arange(8)
    out, lse = attention_reference(q, k, v, 0.25, qp, kp)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isfinite(lse[1:]).all()
    o1, l1 = attention_reference(q[1:2], k[:1], v[:1], 0.25)
    torch.testing.assert_close(out[1:2], o1)
    torch.testing.assert_close(lse[1:2], l1)


# ----------------------------------------------------------------- merge
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_two_halves_equals_whole(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = rnd(7, 9, 64, dtype=dtype, g=g), rnd(20, 3, 64, dtype=dtype, g=g), \
        rnd(20, 3, 64, dtype=dtype, g=g)
    ro, rl = attention_reference(q.float(), k.float(), v.float(), 0.125)
    oa, la = attention_reference(q.float(), k[:5].float(), v[:5].float(), 0.125)
    ob, lb = attention_reference(q.float(), k[5:].float(), v[5:].float(), 0.125)
    out, lse = merge_attention(oa.to(dtype), la, ob.to(dtype), lb)
    close(out, lse, ro, rl, dtype)


def test_merge_neg_inf_cases_and_shapes():
    g = torch.Generator().manual_seed(3)
    oa, ob = rnd(2, 3, 4, 8, g=g), rnd(2, 3, 4, 8, g=g)
    la, lb = rnd(2, 3, 4, g=g), rnd(2, 3, 4, g=g)
    la[0, 0, 0] = NEG_INF
    oa[0, 0, 0] = 0
    lb[1, 2, 3] = NEG_INF
    ob[1, 2, 3] = 0
    la[1, 1, 1] = lb[1, 1, 1] = NEG_INF
    oa[1, 1, 1] = ob[1, 1, 1] = 0
    out, lse = merge_attention(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0, 0, 0], ob[0, 0, 0])
    torch.testing.assert_close(lse[0, 0, 0], lb[0, 0, 0])
    torch.testing.assert_close(out[1, 2, 3], oa[1, 2, 3])
    assert torch.isneginf(lse[1, 1, 1]) and (out[1, 1, 1] == 0).all()
    # the empty partial is the identity
    e_o, e_l = torch.zeros_like(oa), torch.full_like(la, NEG_INF)
    out, lse = merge_attention(oa, la, e_o, e_l)
    torch.testing.assert_close(out, oa)
    torch.testing.assert_close(lse, la)
    # large lse values do not overflow
    out, lse = merge_attention(oa, la + 1e4, ob, lb + 1e4)
    assert torch.isfinite(lse[~torch.isneginf(lse)]).all() and not torch.isnan(out).any()
    with pytest.raises(ValueError):
        merge_attention(oa, la[..., :2], ob, lb)
    with pytest.raises(ValueError):
        merge_attention_many([], [])


@pytest.mark.parametrize("seed", range(4))
def test_ring_invariant_random_splits(seed):
    """Attention over keys split into random (possibly empty) parts, merged in any order and
    grouping, equals attention over all keys: the ring-attention / distributed-decode invariant."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = HEADS[seed % 2]
    lq, lk = rng.randint(1, 12), rng.randint(1, 60)
    q, k, v = rnd(lq, H, D, g=g), rnd(lk, Hkv, D, g=g), rnd(lk, Hkv, D, g=g)
    ro, rl = attention_reference(q, k, v, D ** -0.5)
    perm = torch.randperm(lk, generator=g)             # shards need not be contiguous
    cuts = sorted(rng.randint(0, lk) for _ in range(rng.randint(1, 5)))
    bounds = [0] + cuts + [lk]
    parts = [acpu.full_attention(q, k[perm[a:b]], v[perm[a:b]], D ** -0.5)
             for a, b in zip(bounds, bounds[1:])]
    rng.shuffle(parts)
    out, lse = merge_attention_many([p[0] for p in parts], [p[1] for p in parts])
    close(out, lse, ro, rl, torch.float32)
    acc = parts[0]                                     # sequential folding, as a ring does
    for p in parts[1:]:
        acc = merge_attention(acc[0], acc[1], p[0], p[1])
    close(acc[0], acc[1], ro, rl, torch.float32)


def test_striped_causal_partials_merge():
    """Striped ring prefill: each shard holds every n-th token; partials with a position mask
    merge to the causal result (exercises rows whose partial is empty)."""
    g = torch.Generator().manual_seed(5)
    L, H, Hkv, D = 23, 9, 3, 64
    q, k, v = rnd(L, H, D, g=g), rnd(L, Hkv, D, g=g), rnd(L, Hkv, D, g=g)
    pos = torch.arange(L)
    ro, rl = attention_reference(q, k, v, 0.125, pos, pos)
    n = 3
    parts = [attention_reference(q, k[r::n], v[r::n], 0.125, pos, pos[r::n]) for r in range(n)]
    out, lse = merge_attention_many([p[0] for p in parts], [p[1] for p in parts])
    close(out, lse, ro, rl, torch.float32)


# ----------------------------------------------------------------- causal / full
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
def test_causal_attention(dtype, H, Hkv, D):
    g = torch.Generator().manual_seed(6)
    for L in (1, 2, 17, 70):
        q, k, v = rnd(L, H, D, dtype=dtype, g=g), rnd(L, Hkv, D, dtype=dtype, g=g), \
            rnd(L, Hkv, D, dtype=dtype, g=g)
        pos = torch.arange(L)
        ro, rl = attention_reference(q.float(), k.float(), v.float(), D ** -0.5, pos, pos)
        out, lse = acpu.causal_attention(q, k, v, D ** -0.5)
        close(out, lse, ro, rl, dtype)
    out, lse = acpu.causal_attention(rnd(0, H, D), rnd(0, Hkv, D), rnd(0, Hkv, D), 0.1)
    assert out.shape == (0, H, D) and lse.shape == (0, H)
    with pytest.raises(ValueError):
        acpu.causal_attention(rnd(3, H, D), rnd(4, Hkv, D), rnd(4, Hkv, D), 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
def test_full_attention(dtype, H, Hkv, D):
    g = torch.Generator().manual_seed(7)
    for lq, lk in ((1, 1), (1, 300), (5, 33), (40, 7)):
        q, k, v = rnd(lq, H, D, dtype=dtype, g=g), rnd(lk, Hkv, D, dtype=dtype, g=g), \
            rnd(lk, Hkv, D, dtype=dtype, g=g)
        ro, rl = attention_reference(q.float(), k.float(), v.float(), D ** -0.5)
        out, lse = acpu.full_attention(q, k, v, D ** -0.5)
        close(out, lse, ro, rl, dtype)
    q = rnd(4, H, D, dtype=dtype)
    out, lse = acpu.full_attention(q, rnd(0, Hkv, D, dtype=dtype), rnd(0, Hkv, D, dtype=dtype),
                                   0.1)
    assert torch.isneginf(lse).all() and (out == 0).all() and out.dtype == dtype


def test_non_contiguous_inputs():
    """q/k/v as strided views of a fused qkv projection, the way the model produces them."""
    g = torch.Generator().manual_seed(8)
    L, H, Hkv, D = 19, 9, 3, 64
    qkv = rnd(L, (H + 2 * Hkv) * D, g=g)
    q = qkv[:, :H * D].view(L, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(L, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(L, Hkv, D)
    assert not q.is_contiguous()
    pos = torch.arange(L)
    ro, rl = attention_reference(q, k, v, 0.125, pos, pos)
    close(*acpu.causal_attention(q, k, v, 0.125), ro, rl, torch.float32)
    ro, rl = attention_reference(q, k, v, 0.125)
    close(*acpu.full_attention(q, k, v, 0.125), ro, rl, torch.float32)


# ----------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
def test_chunk_prefill_matches_reference_with_positions(dtype, H, Hkv, D):
    g = torch.Generator().manual_seed(9)
    for L, S in ((1, 0), (6, 0), (1, 50), (13, 29), (32, 5)):
        q = rnd(L, H, D, dtype=dtype, g=g)
        k_all, v_all = rnd(S + L, Hkv, D, dtype=dtype, g=g), rnd(S + L, Hkv, D, dtype=dtype, g=g)
        ro, rl = attention_reference(q.float(), k_all.float(), v_all.float(), D ** -0.5,
                                     torch.arange(S, S + L), torch.arange(S + L))
        kc, vc = (k_all[:S], v_all[:S]) if S else (None, None)
        out, lse = acpu.chunk_prefill_attention(q, k_all[S:], v_all[S:], kc, vc, D ** -0.5)
        close(out, lse, ro, rl, dtype)


# ----------------------------------------------------------------- paged cache
def make_paged(lens, Hkv, D, bs, dtype, g, extra_blocks=3):
    """Random paged cache with shuffled block ids; returns caches, tables and per-row kv."""
    nblks = [-(-n // bs) for n in lens]
    maxb = max(nblks + [1]) + 1
    num_blocks = sum(nblks) + extra_blocks
    k_cache = rnd(num_blocks, bs, Hkv, D, dtype=dtype, g=g)
    v_cache = rnd(num_blocks, bs, Hkv, D, dtype=dtype, g=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), maxb, dtype=torch.int32)   # unused entries left at 0
    rows_kv = []
    for b, (n, nb) in enumerate(zip(lens, nblks)):
        ids = [perm.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor([ids[t // bs] * bs + t % bs for t in range(n)], dtype=torch.long)
        rows_kv.append((k_cache.view(-1, Hkv, D)[slots], v_cache.view(-1, Hkv, D)[slots]))
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), rows_kv


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_gather_kv(bs):
    g = torch.Generator().manual_seed(10)
    lens = [1, bs, bs + 1, 37]
    kc, vc, tables, _, rows_kv = make_paged(lens, 3, 8, bs, torch.float32, g)
    for b, n in enumerate(lens):
        k, v = acpu.gather_kv(kc, vc, tables[b], n)
        assert k.shape == (n, 3, 8)
        assert torch.equal(k, rows_kv[b][0]) and torch.equal(v, rows_kv[b][1])


DECODE_STRATEGIES = {
    "auto": acpu.paged_decode_attention,
    "per_row": acpu.paged_decode_per_row,
    "batched": acpu.paged_decode_batched,
}


@pytest.mark.parametrize("strategy", sorted(DECODE_STRATEGIES))
@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
def test_paged_decode(strategy, bs, dtype, H, Hkv, D):
    g = torch.Generator().manual_seed(11 + bs)
    rng = random.Random(bs)
    lens = [rng.randint(0, 150) for _ in range(6)] + [0, 1, 300]
    kc, vc, tables, cl, rows_kv = make_paged(lens, Hkv, D, bs, dtype, g)
    q = rnd(len(lens), H, D, dtype=dtype, g=g)
    out, lse = DECODE_STRATEGIES[strategy](q, kc, vc, tables, cl, D ** -0.5)
    for b, n in enumerate(lens):
        ro, rl = attention_reference(q[b:b + 1].float(), rows_kv[b][0].float(),
                                     rows_kv[b][1].float(), D ** -0.5)
        close(out[b:b + 1], lse[b:b + 1], ro, rl, dtype)
    assert torch.isneginf(lse[6]).all() and (out[6] == 0).all()


@pytest.mark.parametrize("fn", ["paged_decode_attention", "paged_decode_attention_torch"])
@pytest.mark.parametrize("budget", [1, 64, 1 << 30])
def test_paged_decode_grouping(monkeypatch, budget, fn):
    """Every grouping of the torch fallback (all per-row, mixed, one batched call), and the
    dispatching entry point (the C++ kernel when built), give the reference answer."""
    monkeypatch.setattr(torch_attention, "DECODE_GROUP_TOKENS", budget)
    g = torch.Generator().manual_seed(12)
    lens = [3, 0, 40, 7, 7, 100, 1, 64]
    kc, vc, tables, cl, rows_kv = make_paged(lens, 3, 64, 4, torch.float32, g)
    q = rnd(len(lens), 9, 64, g=g)
    out, lse = acpu.paged_decode_attention(q, kc, vc, tables, cl, 0.125)
    for b in range(len(lens)):
        ro, rl = attention_reference(q[b:b + 1], rows_kv[b][0], rows_kv[b][1], 0.125)
        close(out[b:b + 1], lse[b:b + 1], ro, rl, torch.float32)
    # all-empty batch and empty batch
    zeros = torch.zeros(2, dtype=torch.int32)
    out, lse = acpu.paged_decode_attention(q[:2], kc, vc, tables[:2], zeros, 0.1)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out, lse = acpu.paged_decode_attention(q[:0], kc, vc, tables[:0], cl[:0], 0.1)
    assert out.shape == (0, 9, 64) and lse.shape == (0, 9)


def test_distributed_decode_shards_merge():
    """A request whose KV is spread over shards (instances): per-shard paged decode partials,
    including an empty shard, merge to decode over the whole context."""
    g = torch.Generator().manual_seed(13)
    total, shards = 90, [0, 31, 59, 90]
    kc, vc, tables, cl, rows_kv = make_paged([total], 3, 64, 16, torch.float32, g)
    q = rnd(1, 9, 64, g=g)
    ro, rl = attention_reference(q, rows_kv[0][0], rows_kv[0][1], 0.125)
    parts = []
    for a, b in zip(shards, shards[1:]):
        k, v = rows_kv[0][0][a:b], rows_kv[0][1][a:b]
        skc, svc, stab, scl, _ = make_paged([b - a], 3, 64, 4, torch.float32, g)
        for t in range(b - a):          # write the shard's tokens into its own paged cache
            slot = int(stab[0, t // 4]) * 4 + t % 4
            skc.view(-1, 3, 64)[slot] = k[t]
            svc.view(-1, 3, 64)[slot] = v[t]
        parts.append(acpu.paged_decode_attention(q, skc, svc, stab, scl, 0.125))
    parts.append(acpu.paged_decode_attention(q, kc, vc, tables, torch.zeros(1, dtype=torch.int32),
                                             0.125))                       # empty shard
    out, lse = merge_attention_many([p[0] for p in parts], [p[1] for p in parts])
    close(out, lse, ro, rl, torch.float32)


# ----------------------------------------------------------------- backends
def test_backend_selector():
    be = get_attention_backend("cpu")
    assert be.name == "cpu" and be is get_attention_backend(torch.device("cpu"))
    for fn in ("causal_attention", "full_attention", "gather_kv", "paged_decode_attention",
               "chunk_prefill_attention", "merge_attention", "merge_attention_many"):
        assert callable(getattr(be, fn))
    assert be.paged_decode_attention is acpu.paged_decode_attention
    with pytest.raises(ValueError, match="unsupported device"):
        get_attention_backend("tpu")


def test_cuda_module_imports_without_gpu():
    mod = importlib.import_module("loong.attention.cuda")
    assert callable(mod.paged_decode_attention)
    assert get_attention_backend("cuda:0").name == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    be = get_attention_backend("cuda")
    g = torch.Generator().manual_seed(14)
    H, Hkv, D, L, S = 9, 3, 64, 21, 40
    q = rnd(L, H, D, dtype=dtype, g=g)
    k_all, v_all = rnd(S + L, Hkv, D, dtype=dtype, g=g), rnd(S + L, Hkv, D, dtype=dtype, g=g)
    ro, rl = attention_reference(q.float(), k_all.float(), v_all.float(), 0.125,
                                 torch.arange(S, S + L), torch.arange(S + L))
    out, lse = be.chunk_prefill_attention(q.cuda(), k_all[S:].cuda(), v_all[S:].cuda(),
                                          k_all[:S].cuda(), v_all[:S].cuda(), 0.125)
    close(out.cpu(), lse.cpu(), ro, rl, dtype)
    lens = [0, 5, 77]
    kc, vc, tables, cl, rows_kv = make_paged(lens, Hkv, D, 16, dtype, g)
    qd = rnd(3, H, D, dtype=dtype, g=g)
    out, lse = be.paged_decode_attention(qd.cuda(), kc.cuda(), vc.cuda(), tables.cuda(),
                                         cl.cuda(), 0.125)
    for b in range(3):
        ro, rl = attention_reference(qd[b:b + 1].float(), rows_kv[b][0].float(),
                                     rows_kv[b][1].float(), 0.125)
        close(out[b:b + 1].cpu(), lse[b:b + 1].cpu(), ro, rl, dtype)
