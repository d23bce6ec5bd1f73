"""Our Llama model vs transformers' LlamaForCausalLM on the same random weights (fp32).

Covers GQA, qkv/o bias, tied and untied heads, and every rope_scaling variant (dynamic
NTK beyond the trained length too).
"""
import pytest
import torch
import transformers

from loong.attention.reference import attention_reference
from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.llama import LlamaModel

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def tiny_pair(rope=None, bias=False, tie=True, heads=4, kv_heads=2, arch="llama"):
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
              tie_word_embeddings=tie, rope_theta=10000.0)
    if arch == "llama":
        kw["attention_bias"] = bias
        if rope:
            kw["rope_scaling"] = dict(rope)
        hc = transformers.LlamaConfig(**kw)
        hf = transformers.LlamaForCausalLM(hc).eval()
        name = "LlamaForCausalLM"
    else:
        hc = transformers.Qwen2Config(**kw)
        hf = transformers.Qwen2ForCausalLM(hc).eval()
        name = "Qwen2ForCausalLM"
    d = hc.to_dict()
    d["architectures"] = [name]
    ours = LlamaModel(ModelConfig.from_hf_dict(d), torch.float32, "cpu", max_positions=512)
    ours.load_hf_weights(hf.state_dict())
    return hf, ours


def our_logits(model, ids):
    pos = torch.arange(len(ids))

    def attn(_, q, k, v):
        return attention_reference(q, k, v, q.shape[-1] ** -0.5, pos, pos)[0]

    with torch.no_grad():
        return model.logits(model(ids, pos, attn, [(0, len(ids), len(ids))]))


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("bias,tie", [(False, True), (True, False)])
def test_logits_match_transformers(rope, bias, tie):
    hf, ours = tiny_pair(ROPES[rope], bias, tie)
    n = 200 if rope == "dynamic" else 96  # dynamic NTK only differs past the trained length
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(our_logits(ours, ids), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_qwen2_bias_and_gqa_shapes(heads, kv_heads):
    hf, ours = tiny_pair(arch="qwen2", heads=heads, kv_heads=kv_heads, tie=False)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(our_logits(ours, ids), ref, atol=2e-5, rtol=1e-4)


def test_shape_mismatch_names_the_tensor():
    hf, ours = tiny_pair()
    sd = dict(hf.state_dict())
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ModelLoadError, match="down_proj"):
        ours.load_hf_weights(sd)
    sd = dict(hf.state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        ours.load_hf_weights(sd)


def test_unknown_architecture_rejected():
    with pytest.raises(ModelLoadError, match="architectures"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})


def _perturb(hf, scale=0.05, seed=5):
    """Change every weight of a transformers model (as a training step would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_update_hf_weights_in_place_matches_transformers(arch, tie):
    """A full Hugging Face state dict of changed weights, applied in place, gives the changed
    model's logits (the fused q/k/v and gate/up rows, biases and tied heads included)."""
    hf, ours = tiny_pair(arch=arch, tie=tie)
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(3))
    before = our_logits(ours, ids)
    params = [p.data_ptr() for p in ours.parameters()]
    _perturb(hf)
    assert ours.update_hf_weights(hf.state_dict().items()) > 0
    assert [p.data_ptr() for p in ours.parameters()] == params      # in place
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = our_logits(ours, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, before, atol=1e-3)


def test_partial_update_and_bad_updates_change_nothing():
    from loong.errors import InvalidRequestError
    hf, ours = tiny_pair(tie=False)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4))
    _perturb(hf)
    sd = hf.state_dict()
    only = {n: sd[n] for n in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")}
    assert ours.update_hf_weights(only.items()) == 2
    assert torch.equal(ours.layers[1].gate_up[96:], sd["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours.lm_head, sd["lm_head.weight"])
    snapshot = [p.clone() for p in ours.parameters()]
    for bad, match in (({"model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"],
                         "model.layers.9.mlp.up_proj.weight": torch.zeros(96, 64)}, "no weight"),
                       ({"model.layers.0.self_attn.q_proj.weight": sd["model.layers.0.self_attn.q_proj.weight"],
                         "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, r"\(32, 64\)")):
        with pytest.raises(InvalidRequestError, match=match):
            ours.update_hf_weights(bad.items())
        # all checked before anything is copied
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), snapshot))
    assert ours.update_hf_weights([("model.rotary_emb.inv_freq", torch.zeros(3))]) == 0
    our_logits(ours, ids)
