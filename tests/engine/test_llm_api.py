"""The offline API: inputs, outputs, bad input, sampling features through the engine."""
import math

import pytest

from loong import LLM, SamplingParams
from loong.errors import InvalidRequestError, ModelLoadError


@pytest.fixture(scope="module")
def llm(loaded_default):
    return LLM(loaded=loaded_default, dtype="float32", kv_capacity_tokens=4096)


def test_outputs_in_order_with_timing(llm):
    prompts = ["Hello, my name is", [504, 3575, 282, 4649, 314], "Count: one, two,"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(outs) == 3
    assert outs[0].prompt == prompts[0] and outs[1].prompt_token_ids == prompts[1]
    for o in outs:
        assert len(o.token_ids) == 6 and o.finish_reason == "length"
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.ttft is not None and o.ttft > 0
        assert o.tpot is not None and o.tpot > 0
        assert o.e2e_latency >= o.ttft
    # the same prompt alone gives the same greedy tokens as in the batch
    (alone,) = llm.generate([prompts[2]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert alone.token_ids == outs[2].token_ids


@pytest.mark.parametrize("prompt,field", [
    ("", "prompt"),
    ([], "prompt_token_ids"),
    ([1, 2, 49152], "prompt_token_ids"),
    ([1, -1], "prompt_token_ids"),
    ([1, "a"], "prompt_token_ids"),
    (3.5, "prompt"),
])
def test_bad_prompts_name_the_field(llm, prompt, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([prompt], SamplingParams(max_tokens=2))
    assert e.value.field == field and isinstance(e.value, ValueError)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_prompt_plus_max_tokens_beyond_context(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1] * 100], SamplingParams(max_tokens=8192))
    assert e.value.field == "max_tokens"
    assert "context length" in str(e.value)


def test_bad_request_does_not_disturb_requests_in_flight(llm):
    eng = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (expected,) = llm.generate(["The weather today is"], params)
    rid = eng.add_request("The weather today is", params)
    eng.step()
    eng.step()
    with pytest.raises(InvalidRequestError):
        eng.add_request([10**9], params)
    with pytest.raises(InvalidRequestError):
        eng.add_request("x", params, request_id=rid)  # duplicate id in flight
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", ""], params)  # one bad prompt: nothing of the batch is queued
    assert eng.num_unfinished == 1
    done = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done = o
    assert done.request_id == rid and done.token_ids == expected.token_ids


def test_unknown_model_path():
    with pytest.raises(ModelLoadError) as e:
        LLM("/nonexistent/model/dir")
    assert isinstance(e.value, ValueError) and "/nonexistent/model/dir" in str(e.value)


def test_unknown_option_rejected(loaded_default):
    with pytest.raises(InvalidRequestError) as e:
        LLM(loaded=loaded_default, kv_capacity=5)
    assert e.value.field == "kv_capacity"


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = llm.generate(["Once upon a time"], p)[0].token_ids
    mixed = llm.generate(["Other prompt here", "Once upon a time", "More"],
                         [SamplingParams(max_tokens=5, temperature=1.0), p, SamplingParams(max_tokens=9)])
    assert mixed[1].token_ids == a
    other = llm.generate(["Once upon a time"], SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True))[0].token_ids
    assert other != a


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    o = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == base.text[:base.text.index(stop)]
    o = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=20, temperature=0, stop=[stop],
                                                     include_stop_str_in_output=True))[0]
    assert o.text.endswith(stop)
    tok = base.token_ids[2]
    o = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok]))[0]
    assert o.finish_reason == "stop" and o.token_ids == base.token_ids[:3]


def test_min_tokens_and_eos(llm):
    msgs = [{"role": "user", "content": "Say hi."}]
    o = llm.chat(msgs, SamplingParams(max_tokens=60, temperature=0))[0]
    assert o.finish_reason == "stop" and o.token_ids[-1] in llm.engine.eos_token_ids
    n = len(o.token_ids)
    o2 = llm.chat(msgs, SamplingParams(max_tokens=60, temperature=0, min_tokens=n + 3))[0]
    assert len(o2.token_ids) >= n + 3


def test_logprobs(llm):
    o = llm.generate(["The sky is"], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(o.logprobs) == 4
    for tok, (lp, top) in zip(o.token_ids, o.logprobs):
        assert len(top) == 3 and top[0][0] == tok and math.isclose(top[0][1], lp, rel_tol=1e-6)
        assert lp <= 0 and top[0][1] >= top[1][1] >= top[2][1]


def test_chat_uses_template(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    o = llm.chat(msgs, SamplingParams(max_tokens=20, temperature=0))[0]
    assert "Paris" in o.text
    with pytest.raises(InvalidRequestError) as e:
        llm.chat([{"role": "user"}], SamplingParams(max_tokens=2))
    assert e.value.field == "messages[0].content"      # the field at fault, precisely


def test_no_blocks_leak_after_all(llm):
    eng = llm.engine
    assert not eng.has_unfinished()
    assert eng.executor.inspect(0, "integrity") is None
    assert eng.executor.inspect(0, "shards")[0] == {}    # every block free or cached
