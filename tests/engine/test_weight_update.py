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


def push_over_distributed(llm, changed, n_instances: int):
    """A trainer thread broadcasts `changed`'s weights over a weight-update group that the
    LLM's instances join (what a trainer process does); returns the new weight version."""
    import threading

    from loong.tools.server_process import ServerProcess
    from loong.weight_sync import WeightSender
    port = ServerProcess.free_port()
    box: dict = {}

    def trainer():
        try:
            sender = WeightSender("127.0.0.1", port, 1 + n_instances, timeout_s=60)
            box["ready"].wait(60)
            box["names"] = sender.broadcast(changed.state_dict().items())
        except BaseException as e:            # noqa: BLE001 - reported below
            box["error"] = e

    box["ready"] = threading.Event()
    t = threading.Thread(target=trainer, daemon=True)
    t.start()
    llm.init_weight_update_group("127.0.0.1", port, 1 + n_instances, timeout_s=60)
    names, dtypes, shapes = WeightSender.describe(changed.state_dict().items())
    box["ready"].set()
    version = llm.update_weights_from_distributed(names, dtypes, shapes)
    t.join(60)
    assert "error" not in box, box.get("error")
    assert box["names"] == names
    return version


def test_update_over_torch_distributed_matches_transformers(tiny_loaded, tiny_path, changed):
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    assert push_over_distributed(llm, changed, 1) == 1
    want = [hf_greedy(changed, p) for p in PROMPTS]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want


def test_distributed_update_arguments_are_checked(tiny_loaded, tiny_path):
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    with pytest.raises(InvalidRequestError, match="rank_offset"):
        llm.init_weight_update_group("127.0.0.1", 29999, 1 + 1, rank_offset=2)
    with pytest.raises(InvalidRequestError, match="world_size"):
        llm.init_weight_update_group("127.0.0.1", 29999, 1)
    with pytest.raises(InvalidRequestError, match="names"):
        llm.update_weights_from_distributed(["model.norm.weight"], [], [])
    with pytest.raises(InvalidRequestError, match="dtypes"):
        llm.update_weights_from_distributed(["model.norm.weight"], ["floaty"], [(64,)])
    with pytest.raises(InvalidRequestError, match=r"model.norm.weight.*\(3,\)"):
        llm.update_weights_from_distributed(["model.norm.weight"], ["float32"], [(3,)])
    # Not in a group yet: the instance says what to do; nothing changed.
    from loong.cluster.errors import ClusterError
    with pytest.raises(ClusterError, match="init_weight_update_group"):
        llm.update_weights_from_distributed(["model.norm.weight"], ["float32"], [(64,)])
    assert llm.weight_version == 0


def test_sampled_token_logprobs_are_transformers_log_softmax(tiny_loaded, tiny_path, changed):
    """Raw logprobs of sampled tokens (temperature and penalties on) equal the log-softmax of
    transformers' logits at those positions, also after a weight update."""
    llm = LLM(tiny_path, loaded=tiny_loaded, dtype="float32")
    params = SamplingParams(max_tokens=10, temperature=1.3, repetition_penalty=1.4, seed=11,
                            logprobs=2, ignore_eos=True)
    for model in (hf_model(tiny_path), changed):
        if model is changed:
            llm.update_weights(changed.state_dict())
        for prompt in PROMPTS:
            out = llm.generate(prompt, params)[0]
            ids = torch.tensor([prompt + out.token_ids])
            with torch.no_grad():
                lp = model(ids).logits[0].float().log_softmax(-1)
            n = len(prompt)
            want = [float(lp[n - 1 + t, tok]) for t, tok in enumerate(out.token_ids)]
            got = [chosen for chosen, _ in out.logprobs]
            assert got == pytest.approx(want, abs=2e-4)
            for t, (_, top) in enumerate(out.logprobs):      # top-2 of the model's own
                vals, idx = lp[n - 1 + t].topk(2)
                assert [i for i, _ in top] == idx.tolist()
