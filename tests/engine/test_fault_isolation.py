"""Fault isolation in the in-process engine: an error raised while running one request
(sampling its row, or the forward pass of its tokens) ends that request with
finish_reason "error" and a message; the requests batched with it get exactly the
tokens they get without the fault, and no KV block leaks."""
import pytest

from loong import LLM, SamplingParams
from loong.worker import faults

MARKER = 77
PROMPTS = [[5, 9, 13, 40, 41], [7, 8, MARKER, 30], [100, 101, 102, 103, 104, 105], [11] * 20]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, dtype="float32", device="cpu", kv_capacity_tokens=4096)


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("where", ["sample", "forward"])
def test_one_failing_request_ends_alone(llm, reference, where):
    faults.inject(f"{where}:{MARKER}")
    try:
        outs = llm.generate(PROMPTS, GREEDY)
    finally:
        faults.inject(None)
    bad = outs[1]
    assert bad.finish_reason == "error" and "injected" in bad.error and where in bad.error
    for i in (0, 2, 3):
        assert outs[i].finish_reason == "length" and outs[i].error is None
        assert outs[i].token_ids == reference[i].token_ids
    eng = llm.engine
    assert not eng.has_unfinished() and eng.executor.inspect(0, "shards")[0] == {}
    assert eng.executor.inspect(0, "integrity") is None      # every block free or cached
    assert llm.generate(PROMPTS[1], GREEDY)[0].token_ids == reference[1].token_ids


def test_output_processing_failure_ends_that_request(llm, reference):
    """A bug in per-request output handling (here: its detokenizer) ends only it."""
    eng = llm.engine
    rids = [eng.add_request(p, GREEDY) for p in PROMPTS[:2]]
    eng._states[rids[1]].detok.step = None        # noqa: SLF001 - break one request
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert done[rids[1]].finish_reason == "error" and "processing its output" in done[rids[1]].error
    assert done[rids[0]].token_ids == reference[0].token_ids
    assert eng.executor.inspect(0, "shards")[0] == {}
    assert eng.executor.inspect(0, "integrity") is None
