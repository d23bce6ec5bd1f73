"""The point of ESP: a prompt longer than any instance's KV capacity, and the default model.

- 32K tokens on a tiny random model with long RoPE, 4 instances of 10K tokens each, against
  one instance with room for all of it: same prefill logits (fp32 tolerance), same greedy
  tokens.
- SmolLM2-135M (the embedded default) on 4 instances with small KV pools, 1, 2 and 3
  masters and scale-up: same greedy tokens as the single-instance engine.
"""
import random

import pytest
import torch

from loong import LLM, SamplingParams
from tests.dist.conftest import assert_clean, build_model, reference_logits, start_cluster
from tests.helpers_models import write_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def long_rope_model(tmp_path_factory):
    from loong.model.loader import load_model_files
    path = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_long"), tokenizer="bytes",
                                    max_position_embeddings=40960, rope_theta=1e6, hidden_size=64,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, seed=5)
    return str(path), load_model_files(str(path))


def test_prompt_longer_than_any_instance(long_rope_model):
    path, loaded = long_rope_model
    rng = random.Random(0)
    ids = [rng.randrange(3, 262) for _ in range(32000)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    single = LLM(path, loaded=loaded, dtype="float32", kv_capacity_tokens=40000,
                 max_num_batched_tokens=4096)
    want = single.generate([ids], sp)[0].token_ids
    with start_cluster(loaded, path, instances=4, kv_capacity_tokens=10000) as llm:
        eng = llm.engine
        eng.want_logits, eng.logits = True, {}
        out = llm.generate([ids], sp)[0]
        assert out.token_ids == want
        stats = eng.policy.stats
        assert stats["group_sizes"] == {4: 1} and stats["preemptions"] == 0
        # No instance could hold it; the prefill logits match a plain causal forward.
        assert eng.executor.blocks_per_instance * eng.block_size < len(ids)
        ref, _ = reference_logits(build_model(loaded), ids)
        torch.testing.assert_close(eng.logits[out.request_id], ref, atol=1e-4, rtol=1e-4)
        assert_clean(llm)


def test_default_model_greedy_on_four_instances(loaded_default, long_text):
    tok = loaded_default.tokenizer
    prompts = [tok.encode(long_text[:2500]), tok.encode("The capital of France is"),
               tok.encode(long_text[5000:6200]), tok.encode("1, 2, 3, 4,")]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    single = LLM(loaded=loaded_default, dtype="float32", kv_capacity_tokens=4096)
    want = [o.token_ids for o in single.generate(prompts, sp)]
    del single
    from tests.dist.conftest import use_policy
    with start_cluster(loaded_default, instances=4, kv_capacity_tokens=512) as llm:
        for masters in (1, 2, 3):
            policy = use_policy(llm, decode_masters=masters)
            got = [o.token_ids for o in llm.generate(prompts, sp)]
            assert got == want, f"{masters} masters"
            assert policy.stats["masters"].get(masters, 0) > 0
            assert policy.stats["scale_ups"] > 0 or masters == 1
            assert_clean(llm)
