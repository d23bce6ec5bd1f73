"""`LLM.as_completed` (issue 19): completions as they end, each exactly once, in the order
they end; weight updates between them; leaving early aborts the rest. `LLM.abort_all`."""
from __future__ import annotations

import pytest

from loong import LLM, SamplingParams

P = [[5 + (7 * i + 3 * j) % 200 for j in range(n)] for i, n in enumerate((3, 20, 41))]


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, dtype="float32")


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_yields_each_completion_once_in_the_order_they_end(llm):
    params = [greedy(30), greedy(5), SamplingParams(max_tokens=15, temperature=1.0, seed=3,
                                                    ignore_eos=True, n=2)]
    got = list(llm.as_completed(P, params))
    assert [(i, o.index) for i, o in got][:1] == [(1, 0)]           # the 5-token one first
    assert sorted((i, o.index) for i, o in got) == [(0, 0), (1, 0), (2, 0), (2, 1)]
    assert [i for i, _ in got][-1] == 0                              # the 30-token one last
    ends = [o.metrics.finish_time for _, o in got]
    assert ends == sorted(ends)
    assert all(o.finish_reason == "length" for _, o in got)
    assert [len(o.token_ids) for i, o in got if i == 2] == [15, 15]
    # The same completions as generate() gives.
    want = llm.generate(P, params)
    by_key = {(i, o.index): o.token_ids for i, o in got}
    assert by_key[(0, 0)] == want[0].token_ids and by_key[(1, 0)] == want[1].token_ids
    assert [by_key[(2, k)] for k in (0, 1)] == [c.token_ids for c in want[2].outputs]
    assert not llm.engine.has_unfinished()


def test_weights_can_change_between_completions(tiny_path):
    from tests.engine.test_weight_update import hf_model, perturb
    llm = LLM(tiny_path, dtype="float32")
    it = llm.as_completed(P, [greedy(4), greedy(40), greedy(40)])
    i, first = next(it)
    assert i == 0 and first.weight_version == 0
    llm.update_weights(perturb(hf_model(tiny_path)).state_dict())
    rest = list(it)
    assert sorted(i for i, _ in rest) == [1, 2]
    assert all((o.weight_version_start, o.weight_version) == (0, 1) for _, o in rest)


def test_leaving_early_aborts_the_rest(llm):
    it = llm.as_completed(P, [greedy(2), greedy(300), greedy(300)])
    i, _ = next(it)
    assert i == 0 and llm.engine.has_unfinished()
    it.close()
    assert not llm.engine.has_unfinished()
    assert llm.generate(P[0], greedy(3))[0].finish_reason == "length"     # usable after


def test_abort_all(llm):
    eng = llm.engine
    rids = [eng.add_request(p, greedy(100)) for p in P[:2]] + [eng.add_request(P[2], greedy(100, n=2))]
    eng.step()
    outs = llm.abort_all()
    assert sorted(o.request_id for o in outs) == sorted(rids)
    assert all(o.finish_reason == "abort" for o in outs)
    assert all(c.finish_reason == "abort" for c in outs[-1].outputs or [])
    assert not eng.has_unfinished() and llm.abort_all() == []
