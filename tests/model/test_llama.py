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
