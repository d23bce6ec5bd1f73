"""EngineLoop over a tiny in-process engine: streamed deltas equal offline generation;
admission bounds, duplicate ids and bad input are rejected with the right cause; aborts,
timeouts, drain and an engine failure end every stream and free the KV."""
import queue
import threading

import pytest

from loong.sampling_params import SamplingParams
from loong.serve.engine_loop import EngineLoop, warm_up
from loong.serve.submission import Rejected, Submission
from loong.serve.server_stats import ServerStats
from tests.serve.conftest import make_engine, request_kv, wait_until

GREEDY = dict(temperature=0.0, ignore_eos=True)


def ids(n, seed):
    return [(seed * 7 + 13 * i) % 250 + 3 for i in range(n)]


def run_to_end(loop, sub, timeout=60.0):
    q = queue.Queue()
    rid = loop.submit(sub, q.put).result(timeout)
    deltas = []
    while not deltas or not (deltas[-1].finish_reason or deltas[-1].error):
        deltas.append(q.get(timeout=timeout))
    return rid, deltas


def held(loop):
    """Block the loop thread until the returned event is set (commands then queue up and
    run in one batch)."""
    release, entered = threading.Event(), threading.Event()
    loop.call(lambda _e: (entered.set(), release.wait(30)))
    assert entered.wait(10)
    return release


@pytest.fixture
def loop(tiny_path):
    lp = EngineLoop(make_engine(tiny_path), ServerStats(), max_queued_requests=3,
                    max_queued_tokens=200).start()
    yield lp
    lp.stop()


def test_streamed_deltas_equal_offline(tiny_path):
    from loong import LLM
    prompts = [ids(n, s) for s, n in enumerate((5, 40, 17, 90))]
    params = SamplingParams(max_tokens=12, **GREEDY)
    ref = LLM(tiny_path, dtype="float32", device="cpu").generate(prompts, params)
    lp = EngineLoop(make_engine(tiny_path)).start()
    try:
        results = [None] * len(prompts)

        def one(i):
            results[i] = run_to_end(lp, Submission(prompt_token_ids=prompts[i], params=params))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for (rid, deltas), r in zip(results, ref):
            assert [t for d in deltas for t in d.token_ids] == r.token_ids
            assert "".join(d.text for d in deltas) == r.text
            last = deltas[-1]
            assert last.finish_reason == "length" and last.completion_tokens == 12
            assert last.prompt_tokens == len(r.prompt_token_ids)
            assert last.timing["e2e_s"] >= last.timing["ttft_s"] > 0
            assert all(d.finish_reason is None for d in deltas[:-1])
        assert lp.stats.as_dict()["finished"] == 4
        assert lp.stats.as_dict()["completion_tokens"] == 48
    finally:
        lp.stop()


def test_queue_bounds_and_duplicates(loop):
    p = SamplingParams(max_tokens=4, **GREEDY)
    release = held(loop)
    futs = [loop.submit(Submission(prompt_token_ids=ids(10, i), params=p, request_id=f"r{i}"),
                        lambda d: None) for i in range(5)]
    dup = loop.submit(Submission(prompt_token_ids=ids(10, 0), params=p, request_id="r0"),
                      lambda d: None)
    wait_until(lambda: loop.num_preparing == 0, what="preparation off the loop thread")
    release.set()
    assert [f.result(10) for f in futs[:3]] == ["r0", "r1", "r2"]
    for f in futs[3:]:
        with pytest.raises(Rejected) as e:
            f.result(10)
        assert e.value.cause == "queue_full" and "3 requests" in str(e.value)
    with pytest.raises(Rejected) as e:
        dup.result(10)
    assert e.value.cause == "duplicate" and e.value.field == "request_id"
    wait_until(lambda: loop.num_in_flight == 0, what="requests to finish")
    # Prompt tokens: 150 + 60 > 200 waiting tokens.
    release = held(loop)
    a = loop.submit(Submission(prompt_token_ids=ids(150, 1), params=p), lambda d: None)
    b = loop.submit(Submission(prompt_token_ids=ids(60, 2), params=p), lambda d: None)
    wait_until(lambda: loop.num_preparing == 0, what="preparation off the loop thread")
    release.set()
    assert a.result(10)
    with pytest.raises(Rejected) as e:
        b.result(10)
    assert e.value.cause == "queue_full" and "prompt tokens" in str(e.value)


def test_bad_input_names_the_field(loop):
    cases = [(Submission(prompt=""), "prompt"),
             (Submission(prompt_token_ids=[1, 10**6]), "prompt_token_ids"),
             (Submission(prompt_token_ids=ids(10, 0), params=SamplingParams(max_tokens=5000)),
              "max_tokens"),
             (Submission(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role")]
    for sub, field in cases:
        with pytest.raises(Rejected) as e:
            loop.submit(sub, lambda d: None).result(10)
        assert e.value.cause == "invalid" and e.value.field == field, (field, e.value)
    assert loop.num_in_flight == 0


def test_abort_timeout_and_kv_freed(loop):
    q = queue.Queue()
    rid = loop.submit(Submission(prompt_token_ids=ids(30, 3),
                                 params=SamplingParams(max_tokens=3000, **GREEDY)), q.put).result(10)
    first = q.get(timeout=30)
    assert first.token_ids and first.finish_reason is None
    assert loop.abort(rid, "client").result(10) is True
    while True:
        d = q.get(timeout=30)
        if d.finish_reason:
            break
    assert d.finish_reason == "abort" and d.completion_tokens >= 1
    assert loop.abort(rid, "client").result(10) is False
    _, deltas = run_to_end(loop, Submission(prompt_token_ids=ids(30, 4), timeout_s=0.3,
                                            params=SamplingParams(max_tokens=3000, **GREEDY)))
    assert deltas[-1].finish_reason == "timeout"
    wait_until(lambda: loop.stats.as_dict()["running"] == 0, what="stats to settle")
    wait_until(lambda: request_kv(loop.engine) == {}, what="KV to be freed")
    st = loop.stats.as_dict()
    assert st["aborts"] == {"client": 1, "timeout": 1} and st["finished"] == 2


def test_drain_aborts_the_rest_and_stops_admitting(tiny_path):
    lp = EngineLoop(make_engine(tiny_path)).start()
    q = queue.Queue()
    lp.submit(Submission(prompt_token_ids=ids(20, 5),
                         params=SamplingParams(max_tokens=3000, **GREEDY)), q.put).result(10)
    q.get(timeout=30)
    assert lp.drain(timeout_s=0.3) == 1
    while True:
        d = q.get(timeout=10)
        if d.finish_reason:
            break
    assert d.finish_reason == "abort"
    with pytest.raises(Rejected) as e:
        lp.submit(Submission(prompt="x"), lambda d: None).result(10)
    assert e.value.cause == "unavailable"
    assert lp.stats.as_dict()["aborts"] == {"shutdown": 1}


def test_engine_failure_ends_streams(tiny_path):
    engine = make_engine(tiny_path)
    failures = []
    lp = EngineLoop(engine, on_failure=failures.append).start()
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("instance 1 exited with code -9")
        return real_step()

    engine.step = flaky_step
    _, deltas = run_to_end(lp, Submission(prompt_token_ids=ids(20, 6),
                                          params=SamplingParams(max_tokens=50, **GREEDY)))
    assert deltas[-1].error and "instance 1 exited" in deltas[-1].error
    assert failures and "instance 1" in failures[0]
    with pytest.raises(Rejected) as e:
        lp.submit(Submission(prompt="x"), lambda d: None).result(10)
    assert e.value.cause == "unavailable"
    lp.stop()


def test_warm_up_leaves_nothing_behind(tiny_path):
    engine = make_engine(tiny_path)
    assert warm_up(engine) > 0
    assert not engine.has_unfinished() and request_kv(engine) == {}
