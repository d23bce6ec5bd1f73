"""In-place weight updates (`LLM.update_weights`, issue 19) on one instance: after an update
with a transformers state dict of changed weights, greedy outputs equal transformers on those
weights (fp32); a safetensors path gives the same; the weight version advances and outputs
report it; the prefix cache never serves KV computed with old weights; bad updates name the
weight and change nothing."""
from __future__ import annotations

import pytest
import torch

from loong import LLM, SamplingParams
from loong.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate((3, 20, 41))]


def hf_model(path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def perturb(hf, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return hf


def hf_greedy(hf, ids, n=16):
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_path):
    from loong.model.loader import load_model_files
    return load_model_files(tiny_path)


@pytest.fixture(scope="module")
def changed(tiny_path):
    return perturb(hf_model(tiny_path))


def test_update_from_state_dict_matches_transformers(tiny_loaded, tiny_path, changed):
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    before = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert llm.weight_version == 0
    assert llm.update_weights(changed.state_dict()) == 1
    outs = llm.generate(PROMPTS, GREEDY)
    want = [hf_greedy(changed, p) for p in PROMPTS]
    assert [o.token_ids for o in outs] == want
    assert want != before
    assert all(o.weight_version_start == 1 and o.weight_version == 1 for o in outs)
    assert llm.engine.executor.inspect(0, "integrity") is None


def test_update_from_safetensors_path_and_named_pairs(tiny_loaded, tiny_path, changed, tmp_path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in changed.state_dict().items()
               if k != "lm_head.weight" or not changed.config.tie_word_embeddings},
              str(tmp_path / "model.safetensors"))
    want = [hf_greedy(changed, p) for p in PROMPTS]
    for source in (str(tmp_path), str(tmp_path / "model.safetensors"),
                   list(changed.named_parameters())):
        llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
        llm.update_weights(source)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want


def test_cached_prefix_is_not_reused_after_an_update(tiny_loaded, tiny_path, changed):
    """The prompt's KV is cached under the old weights; after the update the same prompt
    must be prefilled again (a hit would give the old model's continuation)."""
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32", block_size=4)
    long = [9 + (5 * j) % 150 for j in range(60)]
    llm.generate(long, GREEDY)
    again = llm.generate(long, GREEDY)[0]
    assert again.num_cached_tokens > 0                      # caching works before
    llm.update_weights(changed.state_dict())
    out = llm.generate(long, GREEDY)[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == hf_greedy(changed, long)
    assert llm.engine.cache_stats()["evicted"] > 0
    third = llm.generate(long, GREEDY)[0]                   # cached again, new weights
    assert third.num_cached_tokens > 0 and third.token_ids == out.token_ids


def test_requests_in_flight_report_both_versions(tiny_loaded, tiny_path, changed):
    """A request running across an update goes on with the new weights and says so."""
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    eng = llm.engine
    rid = eng.add_request(PROMPTS[1], GREEDY)
    out = eng.get_output(rid)                  # updated in place until it finishes
    for _ in range(4):
        eng.step()
    assert (out.weight_version_start, out.weight_version) == (0, 0) and out.token_ids
    eng.update_weights(changed.state_dict())
    while eng.has_unfinished():
        eng.step()
    assert out.finish_reason == "length"
    assert (out.weight_version_start, out.weight_version) == (0, 1)


def test_bad_updates_name_the_weight_and_change_nothing(tiny_loaded, tiny_path, changed):
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    want = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    sd = dict(changed.state_dict())
    bad_shape = dict(sd, **{"model.layers.1.mlp.down_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(InvalidRequestError, match="model.layers.1.mlp.down_proj.weight"):
        llm.update_weights(bad_shape)
    with pytest.raises(InvalidRequestError, match="no weight 'model.layers.7.mlp.up_proj.weight'"):
        llm.update_weights(dict(sd, **{"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(InvalidRequestError, match="weights"):
        llm.update_weights({})
    with pytest.raises(InvalidRequestError, match="does not exist"):
        llm.update_weights("/nonexistent/checkpoint")
    with pytest.raises(InvalidRequestError, match="pairs"):
        llm.update_weights([1, 2])
    assert llm.weight_version == 0
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
