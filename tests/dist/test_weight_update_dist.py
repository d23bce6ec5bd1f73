"""Weight updates on a cluster (issue 19): every instance process receives the new weights
over the control connection; greedy outputs then equal transformers on the changed weights
(fp32), with prompts spread over both instances (ring prefill, multi-master decode), and
the prefix cache of every instance is dropped."""
from __future__ import annotations

from loong import SamplingParams
from tests.dist.conftest import assert_clean, start_cluster
from tests.engine.test_weight_update import hf_greedy, hf_model, perturb

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate((4, 90, 150))]


def test_cluster_update_matches_transformers_and_drops_cached_kv(tiny_loaded, tiny_path):
    changed = perturb(hf_model(tiny_path))
    want = [hf_greedy(changed, p, 12) for p in PROMPTS]
    # 2 x 128 tokens: the 150-token prompt spreads over both instances.
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=128,
                       block_size=4, enable_prefix_caching=True) as llm:
        before = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.engine.cache_stats()["inserted"] > 0
        assert llm.update_weights(changed.state_dict()) == 1
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == want != before
        assert all(o.num_cached_tokens == 0 for o in outs)
        assert all(o.weight_version == 1 for o in outs)
        assert llm.engine.policy.stats["group_sizes"].get(2, 0) > 0
        assert_clean(llm)


def test_cluster_update_over_torch_distributed(tiny_loaded, tiny_path):
    from tests.engine.test_weight_update import push_over_distributed
    changed = perturb(hf_model(tiny_path), seed=9)
    want = [hf_greedy(changed, p, 12) for p in PROMPTS]
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=128,
                       block_size=4) as llm:
        assert push_over_distributed(llm, changed, 2) == 1
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        assert_clean(llm)


def test_as_completed_across_an_update_on_a_cluster_yields_every_completion(tiny_loaded,
                                                                            tiny_path):
    """Groups still running when weights change end first; their outputs reach the next
    step(), so the iterator misses none."""
    changed = perturb(hf_model(tiny_path), seed=3)
    with start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=128,
                       block_size=4) as llm:
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                  for m in (2, 30, 30)]
        it = llm.as_completed(PROMPTS, params)
        first = next(it)
        llm.update_weights(changed.state_dict())
        rest = list(it)
        assert sorted(i for i, _ in [first, *rest]) == [0, 1, 2]
        assert_clean(llm)
