"""EngineLoop under hostile use: admission work (tokenizing, rendering) never stalls the
streams in flight; a submission cancelled at any stage is never run or is aborted with
its KV freed; bad fields are rejected naming them; a failing sink or a failing request
never ends the loop."""
import queue
import threading

import pytest

from loong.sampling_params import SamplingParams
from loong.serve.engine_loop import EngineLoop
from loong.serve.submission import Rejected, Submission
from loong.serve.server_stats import ServerStats
from tests.serve.conftest import make_engine, request_kv, wait_until
from tests.serve.test_engine_loop import held, ids, run_to_end

GREEDY = dict(temperature=0.0, ignore_eos=True)


class GatedTokenizer:
    """The engine's tokenizer, except that encoding a text starting with "GATE" waits for
    `gate` (a stand-in for a huge prompt that takes seconds to tokenize)."""

    def __init__(self, inner) -> None:
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()

    def encode(self, text, *args, **kw):
        if text.startswith("GATE"):
            self.entered.set()
            assert self.gate.wait(60)
        return self.inner.encode(text, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def loop(tiny_path):
    lp = EngineLoop(make_engine(tiny_path), ServerStats()).start()
    yield lp
    lp.stop()


def test_tokenizing_does_not_stall_streams_in_flight(loop):
    """Was: tokenizing ran on the engine thread (a 5 MB prompt stalled every stream ~3 s)."""
    tok = GatedTokenizer(loop.engine.tokenizer)
    loop.engine.tokenizer = tok
    q: queue.Queue = queue.Queue()
    loop.submit(Submission(prompt_token_ids=ids(20, 1),
                           params=SamplingParams(max_tokens=3000, **GREEDY)), q.put).result(10)
    q.get(timeout=30)
    slow = loop.submit(Submission(prompt="GATE and then some text",
                                  params=SamplingParams(max_tokens=2, **GREEDY)), lambda d: None)
    assert tok.entered.wait(30)
    got = 0
    for _ in range(10):                     # tokens keep coming while it tokenizes
        d = q.get(timeout=10)
        got += len(d.token_ids)
    assert got >= 10 and not slow.future.done()
    tok.gate.set()
    assert slow.result(30)


def test_cancel_at_any_stage_frees_everything(loop):
    params = SamplingParams(max_tokens=3000, **GREEDY)
    # Before admission: held loop, cancelled while queued -> never admitted.
    release = held(loop)
    early = [loop.submit(Submission(prompt_token_ids=ids(30, i), params=params), lambda d: None)
             for i in range(5)]
    for t in early:
        t.cancel("cancel")
    release.set()
    for t in early:
        with pytest.raises(Rejected) as e:
            t.result(10)
        assert e.value.cause == "cancelled"
    # After admission, running: aborted by the next iteration.
    q: queue.Queue = queue.Queue()
    late = loop.submit(Submission(prompt_token_ids=ids(30, 9), params=params), q.put)
    late.result(10)
    q.get(timeout=30)
    late.cancel("deadline")
    while True:
        d = q.get(timeout=30)
        if d.finish_reason:
            break
    assert d.finish_reason == "abort"
    wait_until(lambda: loop.num_in_flight == 0 and request_kv(loop.engine) == {},
               what="KV to be freed")
    st = loop.stats.as_dict()
    assert st["aborts"] == {"cancel": 5, "deadline": 1}
    assert not loop.engine.has_unfinished()


@pytest.mark.parametrize("sub,field", [
    (Submission(prompt="hi", timeout_s=float("nan")), "timeout_s"),
    (Submission(prompt="hi", timeout_s=float("inf")), "timeout_s"),
    (Submission(prompt="hi", request_id="x" * 200), "request_id"),
    (Submission(prompt="hi", request_id="forged\nline"), "request_id"),
    (Submission(prompt="hi", prompt_token_ids=[5]), "input"),
    (Submission(prompt_token_ids=[5], params=SamplingParams(stop_token_ids=[10**6])),
     "stop_token_ids"),
])
def test_bad_fields_are_named(loop, sub, field):
    with pytest.raises(Rejected) as e:
        loop.submit(sub, lambda d: None).result(10)
    assert e.value.cause == "invalid" and e.value.field == field, e.value


def test_a_failing_sink_or_request_never_ends_the_loop(loop):
    def broken(_d):
        raise RuntimeError("the RPC layer's event loop is closed")
    loop.submit(Submission(prompt_token_ids=ids(10, 2),
                           params=SamplingParams(max_tokens=5, **GREEDY)), broken).result(10)
    wait_until(lambda: loop.num_in_flight == 0, what="the request to finish")
    from loong.worker import faults
    faults.inject("sample:77")
    try:
        _, bad = run_to_end(loop, Submission(prompt_token_ids=[77, 5, 6],
                                             params=SamplingParams(max_tokens=5, **GREEDY)))
    finally:
        faults.inject(None)
    assert bad[-1].finish_reason == "error" and "injected" in bad[-1].error
    _, good = run_to_end(loop, Submission(prompt_token_ids=ids(10, 3),
                                          params=SamplingParams(max_tokens=5, **GREEDY)))
    assert good[-1].finish_reason == "length" and loop.failed is None
    assert loop.stats.as_dict()["aborts"].get("error") == 1
