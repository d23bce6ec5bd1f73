"""The native decode step (loong.ops.decoder_layers) against the eager layer loop: on the same
model, cache and step it must give bitwise the same hidden states, residual stream and KV cache
(it runs the same kernels in the same order), for fp32 and bf16, 1 / 3 / 9 rows (9 takes the
GEMM rather than the skinny kernel), GQA and q/k/v biases, paged attention and a Python
attention callback; and it must not run where it cannot (prefill chunks, eager switch)."""
from __future__ import annotations

import pytest
import torch

from loong import ops
from loong.attention.paged_context import PagedAttention
from loong.kv.cache_pool import KVCachePool
from loong.model.llama import LlamaModel
from loong.model.loader import LoadedModel
from loong.model.random_weights import random_model
from loong.worker.replica_step import prepare_chunks
from loong.sched.cluster_plan import ChunkItem

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")


class _Tok:
    pass


def _model(dtype, bias=False, layers=3):
    from loong.model.config import ModelConfig
    base = LoadedModel(ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                   max_position_embeddings=512), {}, _Tok())
    loaded = random_model(base, num_layers=layers, hidden_size=96, intermediate_size=160,
                          num_heads=6, num_kv_heads=2, seed=7)
    cfg = loaded.config.replace(attention_bias=bias)
    g = torch.Generator().manual_seed(1)
    weights = dict(loaded.weights)
    if bias:
        for i in range(layers):
            for n, rows in (("q", 96), ("k", 32), ("v", 32)):
                weights[f"model.layers.{i}.self_attn.{n}_proj.bias"] = 0.1 * torch.randn(rows, generator=g)
    model = LlamaModel(cfg, dtype=dtype)
    model.load_hf_weights(weights)
    return model


def _step(model, rows, seed=0):
    """A decode step of `rows` requests of different lengths over a shuffled paged cache
    already holding their context; returns (ids, positions, attention) factories' inputs."""
    g = torch.Generator().manual_seed(seed)
    bs = 4
    cache = KVCachePool(model.cfg, 64, bs, model.dtype)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(model.dtype))
    perm = torch.randperm(64, generator=g).tolist()
    items, tables = [], []
    for r in range(rows):
        n = 3 + 5 * r                               # context before the new token
        blocks = [perm.pop() for _ in range(-(-(n + 1) // bs))]
        items.append(ChunkItem(request_id=f"r{r}", token_ids=(7 + r,), start=n, sample=True,
                               keep=()))
        tables.append(blocks)
    return cache, items, tables


def _forward(model, cache, items, tables, native: bool):
    ids, positions, meta, rows, dyn = prepare_chunks(items, tables, cache.block_size, model.device)
    model.native_decode = native
    attn = PagedAttention(cache, meta, model.cfg.head_dim ** -0.5)
    return model(ids, positions, attn)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_native_decode_is_bitwise_the_eager_loop(dtype, rows, bias, monkeypatch):
    model = _model(dtype, bias)
    cache, items, tables = _step(model, rows)
    eager_cache = KVCachePool(model.cfg, 64, cache.block_size, dtype)
    eager_cache.kv.copy_(cache.kv)
    calls = []
    real = ops.decoder_layers
    monkeypatch.setattr(ops, "decoder_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = _forward(model, eager_cache, items, tables, native=False)
    assert not calls
    got = _forward(model, cache, items, tables, native=True)
    assert calls, "the native path did not run"
    assert torch.equal(got, want)
    assert torch.equal(cache.kv, eager_cache.kv)       # the step's k/v written identically


@needs_ext
def test_callback_attention_runs_natively_and_matches():
    """A cluster member's attention is a Python callable the native loop calls back."""
    model = _model(torch.bfloat16)
    cache, items, tables = _step(model, 2)
    ids, positions, meta, _, _ = prepare_chunks(items, tables, cache.block_size, model.device)
    paged = PagedAttention(cache, meta, model.cfg.head_dim ** -0.5)
    layers_seen = []

    class Callback:
        def __call__(self, layer, q, k, v):
            layers_seen.append(layer)
            return paged(layer, q, k, v)

        def native_decode(self):
            return ops.NativeAttention(scale=1.0, callback=self)

    kv0 = cache.kv.clone()
    got = model(ids, positions, Callback())
    assert layers_seen == list(range(model.cfg.num_layers))
    cache.kv.copy_(kv0)
    model.native_decode = False
    assert torch.equal(got, model(ids, positions, paged))


@needs_ext
def test_prefill_chunks_and_the_switch_stay_eager(monkeypatch):
    model = _model(torch.float32)
    calls = []
    monkeypatch.setattr(ops, "decoder_layers", lambda *a, **k: calls.append(1))
    cache = KVCachePool(model.cfg, 16, 4, model.dtype)
    prefill = [ChunkItem(request_id="p", token_ids=(1, 2, 3), start=0, sample=True, keep=())]
    ids, positions, meta, _, _ = prepare_chunks(prefill, [[0]], 4, model.device)
    attn = PagedAttention(cache, meta, 0.25)
    assert attn.native_decode() is None
    model(ids, positions, attn)
    model.native_decode = False
    cache2, items, tables = _step(model, 1)
    _forward(model, cache2, items, tables, native=False)
    assert not calls


def test_plain_function_attention_is_eager():
    """An attention callable without `native_decode` (tests, tools) runs the Python loop."""
    model = _model(torch.float32, layers=2)
    seen = []

    def attn(layer, q, k, v):
        seen.append(layer)
        return q[:, :, :].clone()

    model(torch.tensor([1, 2]), torch.tensor([0, 1]), attn)
    assert seen == [0, 1]


@needs_ext
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.bfloat16, 9)])
def test_in_place_weight_updates_are_seen(dtype, rows, monkeypatch):
    """bf16 at 9 rows runs the projections on packed weight copies (loong.ops.packed_weights):
    an update in place must re-pack them, so the result is a run that never packs (to the
    rounding of the batched kernel)."""
    model = _model(dtype, layers=2)
    cache, items, tables = _step(model, rows)
    kv0 = cache.kv.clone()
    before = _forward(model, cache, items, tables, native=True)
    with torch.no_grad():
        model.layers[1].down.mul_(2.0)
        model.hf_weight_slots()["model.layers.0.mlp.up_proj.weight"].mul_(-1.0)
    cache.kv.copy_(kv0)
    after = _forward(model, cache, items, tables, native=True)
    cache.kv.copy_(kv0)
    eager = _forward(model, cache, items, tables, native=False)
    monkeypatch.setenv("LOONG_PACK_WEIGHTS", "0")
    cache.kv.copy_(kv0)
    unpacked = _forward(model, cache, items, tables, native=True)
    assert not torch.allclose(before.float(), after.float(), rtol=0.1, atol=0.1)
    assert torch.equal(after, eager)
    # Unpacked runs F.linear: bitwise oneDNN's packed GEMM, one bf16 rounding from our kernel's.
    assert torch.allclose(after.float(), unpacked.float(), rtol=2e-2, atol=2e-2)


class _NoPeersComm:
    def wait(self, *handles):
        assert not handles


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_master_without_peers_attends_natively_like_its_eager_exchange(dtype):
    """A decode-group master whose rows' KV is all local (no peer to ask or answer) takes the
    paged native path, bitwise equal to DistDecodeAttention's eager per-layer exchange."""
    from loong.attention.dist_decode import DecodeExchange, DistDecodeAttention, PagedRows
    model = _model(dtype)
    cache, items, tables = _step(model, 3)
    ids, positions, meta, _, _ = prepare_chunks(items, tables, cache.block_size, model.device)
    cfg = model.cfg
    lens = [it.start + 1 for it in items]
    ex = DecodeExchange(meta.slots, PagedRows.build(tables, lens, model.device), {}, {})
    attn = DistDecodeAttention(_NoPeersComm(), ex, cache, cfg.head_dim ** -0.5, cfg.num_heads,
                               cfg.head_dim, dtype)
    native = attn.native_decode()
    assert native.callback is None and native.kv is cache.kv
    kv0 = cache.kv.clone()
    model.native_decode = True
    got = model(ids, positions, attn)
    kv_native = cache.kv.clone()
    cache.kv.copy_(kv0)
    model.native_decode = False
    assert torch.equal(got, model(ids, positions, attn))
    assert torch.equal(cache.kv, kv_native)
    with_peer = DecodeExchange(meta.slots, ex.own, {1: torch.tensor([0])}, {})
    assert DistDecodeAttention(_NoPeersComm(), with_peer, cache, 1.0, cfg.num_heads, cfg.head_dim,
                               dtype).native_decode().callback is not None
