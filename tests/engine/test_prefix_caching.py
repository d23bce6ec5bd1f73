"""Automatic prefix caching and n samples on one instance (the tiny model, fp32): a cache
hit gives exactly the tokens of a cold run (several questions on one document, the next
turn of a conversation, which hits the blocks its answer filled); tenants with different
cache salts never share; eviction under memory pressure keeps results identical and leaks
nothing; n completions share one prompt computation, greedy ones agree, seeded ones equal
separate requests with the derived seeds, and aborting a request ends all of them."""
import pytest

from loong import LLM, SamplingParams
from loong.sampling_params import derive_seed

DOC = [5 + (7 * j + j // 13) % 250 for j in range(300)]
QUESTIONS = [[100 + i, 101, 102 + i, 103] for i in range(4)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make(tiny_path, **kw):
    return LLM(tiny_path, dtype="float32", device="cpu", block_size=4, **kw)


@pytest.fixture(scope="module")
def cold(tiny_path):
    return make(tiny_path, enable_prefix_caching=False)


def clean(llm):
    ex = llm.engine.executor
    assert ex.inspect(0, "integrity") is None and ex.inspect(0, "shards")[0] == {}


def test_questions_on_one_document_hit_and_match(tiny_path, cold):
    want = [o.token_ids for o in cold.generate([DOC + q for q in QUESTIONS], GREEDY)]
    hot = make(tiny_path)
    outs = [hot.generate(DOC + q, GREEDY)[0] for q in QUESTIONS]
    assert [o.token_ids for o in outs] == want
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == len(DOC) for o in outs[1:])     # 300 = 75 blocks
    st = hot.engine.cache_stats()
    assert st["hit_tokens"] == 3 * len(DOC) and st["cached_blocks"][0] >= len(DOC) // 4
    clean(hot)


def test_next_turn_hits_the_blocks_of_the_answer(tiny_path, cold):
    turn1 = DOC[:101]
    sp = SamplingParams(max_tokens=27, temperature=0.0, ignore_eos=True)
    hot = make(tiny_path)
    a1 = hot.generate(turn1, sp)[0]
    turn2 = turn1 + a1.token_ids + [200, 201, 202]
    got = hot.generate(turn2, sp)[0]
    assert got.token_ids == cold.generate(turn2, sp)[0].token_ids
    # The first turn's prompt and all but its answer's last, uncomputed token are cached.
    assert got.num_cached_tokens == (len(turn1) + len(a1.token_ids) - 1) // 4 * 4
    clean(hot)


def test_salts_separate_tenants(tiny_path):
    hot = make(tiny_path)
    a = SamplingParams(max_tokens=2, temperature=0.0, cache_salt="tenant-a")
    b = SamplingParams(max_tokens=2, temperature=0.0, cache_salt="tenant-b")
    assert hot.generate(DOC, a)[0].num_cached_tokens == 0
    assert hot.generate(DOC, b)[0].num_cached_tokens == 0       # not a's blocks
    assert hot.generate(DOC, a)[0].num_cached_tokens > 0
    assert hot.generate(DOC, SamplingParams(max_tokens=2))[0].num_cached_tokens == 0
    clean(hot)


def test_eviction_under_memory_pressure(tiny_path, cold):
    docs = [[(d * 31 + j * 7) % 250 + 3 for j in range(150)] for d in range(5)]
    prompts = [doc + q for doc in docs for q in QUESTIONS[:2]]
    want = [o.token_ids for o in cold.generate(prompts, GREEDY)]
    hot = make(tiny_path, kv_capacity_tokens=400)      # about two documents' worth
    got = [hot.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert got == want
    st = hot.engine.cache_stats()
    assert st["evicted"] > 0 and st["hit_tokens"] > 0
    clean(hot)


def test_n_greedy_completions_agree_and_share_the_prompt(tiny_path):
    hot = make(tiny_path)
    out = hot.generate(DOC, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                           n=3))[0]
    assert len(out.outputs) == 3 and out.outputs[0] is out and out.finished
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert out.outputs[1].token_ids == out.outputs[2].token_ids == out.token_ids
    # All but the last token (its logits are needed), in whole blocks, come from the cache.
    assert all(o.num_cached_tokens == (len(DOC) - 1) // 4 * 4 for o in out.outputs[1:])
    clean(hot)


def test_seeded_completions_equal_separate_requests(tiny_path):
    sp = dict(max_tokens=8, temperature=0.9, top_p=0.95, ignore_eos=True)
    hot = make(tiny_path)
    out = hot.generate(DOC[:60], SamplingParams(seed=11, n=4, **sp))[0]
    alone = [hot.generate(DOC[:60], SamplingParams(seed=derive_seed(11, i), **sp))[0].token_ids
             for i in range(4)]
    assert [o.token_ids for o in out.outputs] == alone
    assert len({tuple(t) for t in alone}) > 1
    clean(hot)


def test_abort_ends_every_completion(tiny_path):
    hot = make(tiny_path)
    eng = hot.engine
    rid = eng.add_request(DOC, SamplingParams(max_tokens=500, temperature=0.0, n=3,
                                             ignore_eos=True))
    for _ in range(3):
        eng.step()
    out = eng.abort(rid)
    assert [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert not eng.has_unfinished() and eng.get_output(rid) is None
    while eng.policy.has_work:
        eng.step()
    clean(hot)
