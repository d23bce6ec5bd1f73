"""Asynchronous groups on the real cluster (`EngineConfig.overlap_groups`, the default):
while one instance runs a long prefill, decodes on the other instance go on step after
step, and the tokens are still the single-instance engine's. In lockstep mode no decode
token comes back while the prefill group runs."""
import pytest

from loong import LLM, SamplingParams
from tests.dist.conftest import assert_clean, start_cluster

SHORT = [11, 12, 13, 14, 15]
LONG = [5 + (7 * j) % 250 for j in range(3500)]
SHORT_SP = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
LONG_SP = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _cluster(tiny_loaded, tiny_path, **kw):
    return start_cluster(tiny_loaded, tiny_path, instances=2, kv_capacity_tokens=4096,
                         block_size=16, max_num_batched_tokens=4096, policy="pd-disagg", **kw)


def _short_decoding_then_long(eng) -> tuple[str, str]:
    """SHORT decoding on the decode instance (3 tokens out), then LONG queued."""
    short = eng.add_request(SHORT, SHORT_SP)
    while len(eng.get_output(short).token_ids) < 3:
        eng.step()
    return short, eng.add_request(LONG, LONG_SP)


@pytest.fixture(scope="module")
def want(tiny_loaded, tiny_path):
    single = LLM(tiny_path, loaded=tiny_loaded, dtype="float32", kv_capacity_tokens=8192)
    return [o.token_ids for o in single.generate([SHORT, LONG], [SHORT_SP, LONG_SP])]


@pytest.mark.parametrize("overlap", [True, False])
def test_decodes_go_on_beside_a_long_prefill(tiny_loaded, tiny_path, want, overlap):
    llm = _cluster(tiny_loaded, tiny_path, overlap_groups=overlap)
    try:
        eng = llm.engine
        short, long_ = _short_decoding_then_long(eng)
        overlapped = 0
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                outs[o.request_id] = list(o.token_ids)
                if o.request_id == short and 0 in eng.executor.busy():
                    overlapped += 1
        tokens = [outs[short], outs[long_]]
        assert tokens == want
        if overlap:
            assert overlapped >= 2, f"{overlapped} decode tokens came back while the prefill ran"
        else:
            assert overlapped == 0
        eng.housekeeping()
        assert_clean(llm)
    finally:
        llm.close()


def test_abort_while_its_group_runs(tiny_loaded, tiny_path):
    """Aborting every request while a long prefill runs: with nothing left running, the
    release goes out at once (housekeeping), before the prefill group's report comes back;
    that stale report must not be checked against the policy's mirror. Then a new request
    is served and every block ends free."""
    llm = _cluster(tiny_loaded, tiny_path)
    try:
        eng = llm.engine
        short, long_ = _short_decoding_then_long(eng)
        eng.step()
        while 0 not in eng.executor.busy() and eng.has_unfinished():
            eng.step()
        assert 0 in eng.executor.busy(), "the long prefill ended before the test could abort"
        eng.abort(short)
        eng.abort(long_)
        eng.housekeeping()                 # nothing runs: the releases are sent now
        while eng.executor.groups_running:
            eng.step()
        again = eng.add_request(SHORT, SHORT_SP)
        last = None
        while eng.has_unfinished():
            last = next((o for o in eng.step() if o.request_id == again), last)
        assert last.finished and len(last.token_ids) == SHORT_SP.max_tokens
        eng.housekeeping()
        assert_clean(llm)
    finally:
        llm.close()
