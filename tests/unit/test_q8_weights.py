"""Q8_0 weights (loong.ops.quantized_weights, csrc/cpu/q8_linear.cpp): the format, the kernel
bit for bit the skinny bf16 kernel on the decoded values, `loong.ops.linear` routing (Q8_0 at
1-8 rows, the rounded parameter above), no stale blocks after an in-place update, and a
Q8_0 model equal to a plain bf16 model holding the same rounded values (eager, native,
after `update_hf_weights`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loong import ops
from loong.errors import InvalidRequestError
from loong.ops import quantized_weights as qw

needs_ext = pytest.mark.skipif(not ops.csrc_available(),
                               reason=f"C++ kernels unavailable: {ops.load_error()}")


@pytest.fixture(autouse=True)
def fresh_forms():
    qw.clear()
    yield
    qw.clear()


def _bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)


def test_format_round_trip_and_zero_blocks():
    w = _bf16(6, 96, scale=3.0)
    w[2, 32:64] = 0                                   # an all-zero block
    qs, scales = qw.quantize_q8_0(w)
    assert qs.dtype == torch.int8 and qs.shape == (6, 96)
    assert scales.dtype == torch.float32 and scales.shape == (6, 3)
    assert int(qs.abs().max()) == 127 and int(qs.min()) >= -127
    blocks = w.float().view(6, 3, 32)
    assert torch.allclose(scales, blocks.abs().amax(-1) / 127)
    assert scales[2, 1] == 0 and not qs[2, 32:64].any()
    back = qw.dequantize_q8_0(qs, scales, torch.float32)
    err = (back - w.float()).view(6, 3, 32).abs().amax(-1)
    assert torch.all(err <= scales / 2 + 1e-7)        # round to nearest: half a step at most
    assert torch.equal(qw.dequantize_q8_0(qs, scales), back.to(torch.bfloat16))


@needs_ext
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (130, 576), (64, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_the_skinny_kernel_on_the_decoded_values(n, k, bias):
    ext = ops._get()
    if not ext.linear_q8_supported():
        pytest.skip("no AVX512_BF16 in this build")
    w = _bf16(n, k, seed=1)
    qs, scales = qw.quantize_q8_0(w)
    wd = qw.dequantize_q8_0(qs, scales)
    b = _bf16(n, seed=2) if bias else None
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for m in range(1, ops.SKINNY_MAX_ROWS + 1):
                x = _bf16(m, k, seed=m)
                got = ext.linear_q8(x, qs, scales, b)
                assert torch.equal(got, ext.linear_small(x, wd, b)), (m, threads)
                ref = qw.linear_q8_torch(x, qs, scales, b)
                assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
        finally:
            torch.set_num_threads(old)
    xs = _bf16(3, k + 40, seed=9)[:, 5:5 + k]         # strided rows
    assert torch.equal(ext.linear_q8(xs, qs, scales, b), ext.linear_small(xs, wd, b))


@needs_ext
def test_ops_linear_routes_by_rows_and_never_uses_stale_blocks():
    w = torch.nn.Parameter(_bf16(96, 64, seed=4), requires_grad=False)
    assert qw.quantize_(w)
    assert qw.active() and qw.q8_form(w) is not None
    plain = w.detach().clone()                        # the rounded values, no blocks
    for m in (1, 5, 8):
        x = _bf16(m, 64, seed=m)
        assert torch.equal(ops.linear(x, w), ops.linear(x, plain))
    x9 = _bf16(9, 64, seed=9)
    assert torch.equal(ops.linear(x9, w), F.linear(x9, plain))
    with torch.no_grad():
        w[3:5].mul_(-2.0)                             # in place, through a view
    assert qw.q8_form(w) is None                      # the blocks went stale
    x = _bf16(2, 64, seed=11)
    assert torch.equal(ops.linear(x, w), ops.linear(x, w.detach().clone()))


def test_quantize_refuses_what_it_cannot_hold():
    assert not qw.quantize_(_bf16(4, 40))             # K not a multiple of 32
    assert not qw.quantize_(_bf16(64))
    assert not qw.quantize_(torch.zeros(4, 32, dtype=torch.int32))
    with torch.inference_mode():
        inf = _bf16(4, 32)
    assert not qw.quantize_(inf)                      # no version counter: no blocks
    assert not qw.active()


def _pair(dtype=torch.bfloat16):
    """A Q8_0 model and a plain one loaded with the Q8_0 model's rounded weights."""
    from loong.model.llama import LlamaModel
    from tests.model.test_native_decode import _model
    q8 = _model(dtype, bias=True)
    assert q8.quantize_q8_0() == len(q8.projections())
    plain = LlamaModel(q8.cfg, dtype=dtype)
    with torch.no_grad():
        for a, b in zip(plain.parameters(), q8.parameters()):
            a.copy_(b)
    return q8, plain


@needs_ext
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("native", [True, False])
def test_q8_model_equals_the_plain_model_on_its_values(rows, native):
    from tests.model.test_native_decode import _forward, _step
    q8, plain = _pair()
    cache, items, tables = _step(q8, rows)
    kv0 = cache.kv.clone()
    got = _forward(q8, cache, items, tables, native=native)
    cache.kv.copy_(kv0)
    want = _forward(plain, cache, items, tables, native=native)
    assert torch.equal(got, want)
    hidden = _bf16(2, q8.cfg.hidden_size, seed=5)
    assert torch.equal(q8.logits(hidden), plain.logits(hidden))


@needs_ext
def test_weight_updates_are_rounded_again():
    q8, _ = _pair()
    slots = q8.hf_weight_slots()
    new = {"model.layers.0.mlp.down_proj.weight": 0.01 * torch.randn(slots[
        "model.layers.0.mlp.down_proj.weight"].shape)}
    q8.update_hf_weights(new.items())
    down = q8.layers[0].down
    form = qw.q8_form(down)
    assert form is not None                           # rounded and blocked again
    qs, scales = qw.quantize_q8_0(new["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(down, qw.dequantize_q8_0(qs, scales))
    assert torch.equal(form[0], qs)


def test_engine_config_rejects_unknown_weight_dtype():
    from loong.config import EngineConfig
    with pytest.raises(InvalidRequestError, match="weight_dtype"):
        EngineConfig(weight_dtype="q4_k")
    assert EngineConfig(weight_dtype="q8_0").weight_dtype == "q8_0"
