"""Prefix caching across instances (4 gloo instances of the tiny model, fp32, 128 tokens
of KV each): a document prefilled over 2, 3 or 4 instances stays cached where it lies, and
the questions that follow reuse it there (their new tokens attend to every holder's
shard) with exactly the tokens of a cold single-instance run; the next turn of a
conversation hits its answer's blocks; concurrent requests sharing a prefix under memory
pressure (preemption, eviction) keep their tokens and leak no block on any instance."""
import pytest

from loong import LLM, SamplingParams
from tests.dist.conftest import assert_clean, start_cluster

N = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
QUESTIONS = [[100 + i, 101, 102 + i] for i in range(3)]


def doc(n, seed):
    return [(seed * 37 + 7 * j + j // 11) % 250 + 3 for j in range(n)]


@pytest.fixture(scope="module")
def cold(tiny_loaded, tiny_path):
    return LLM(tiny_path, loaded=tiny_loaded, dtype="float32", block_size=4,
               enable_prefix_caching=False)


@pytest.fixture(scope="module")
def cluster(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=N, kv_capacity_tokens=128,
                        block_size=4, enable_prefix_caching=True)
    yield llm
    llm.close()


def holders(llm):
    """Instances (plan numbering) holding cached blocks now."""
    return [i for i, n in enumerate(llm.engine.cache_stats()["cached_blocks"]) if n]


@pytest.mark.parametrize("length,spread", [(200, 2), (330, 3), (460, 4)])
def test_sharded_prefix_hits_match_cold(cluster, cold, length, spread):
    d = doc(length, spread)
    prompts = [d + q for q in QUESTIONS]
    want = [o.token_ids for o in cold.generate(prompts, GREEDY)]
    cluster.engine.policy.clear_cache()          # start from nothing cached
    cluster.engine.flush()
    first = cluster.generate(prompts[0], GREEDY)[0]
    assert first.num_cached_tokens == 0 and first.token_ids == want[0]
    assert len(holders(cluster)) >= spread       # the document's blocks lie on that many
    for p, w in zip(prompts[1:], want[1:]):
        o = cluster.generate(p, GREEDY)[0]
        assert o.token_ids == w
        assert o.num_cached_tokens == length // 4 * 4
    assert_clean(cluster)


def test_next_turn_hits_its_answer(cluster, cold):
    cluster.engine.policy.clear_cache()
    cluster.engine.flush()
    sp = SamplingParams(max_tokens=22, temperature=0.0, ignore_eos=True)
    turn1 = doc(150, 9)
    a1 = cluster.generate(turn1, sp)[0]
    turn2 = turn1 + a1.token_ids + [210, 211]
    o = cluster.generate(turn2, sp)[0]
    assert o.token_ids == cold.generate(turn2, sp)[0].token_ids
    assert o.num_cached_tokens == (len(turn1) + len(a1.token_ids) - 1) // 4 * 4
    assert_clean(cluster)


def test_shared_prefix_under_pressure(cluster, cold):
    """Eight requests on two documents at once in 512 tokens of KV: preemption and
    eviction happen, yet every token matches and no block is lost or shared wrongly."""
    docs = [doc(180, 21), doc(170, 22)]
    prompts = [docs[i % 2] + [120 + i, 121] for i in range(8)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in cold.generate(prompts, sp)]
    cluster.generate(prompts[0], SamplingParams(max_tokens=1))     # cache the first doc
    got = [o.token_ids for o in cluster.generate(prompts, sp)]
    assert got == want
    st = cluster.engine.cache_stats()
    assert st["hit_tokens"] > 0 and st["evicted"] > 0
    assert_clean(cluster)
