"""The offline API's input rules: every bad request raises an InvalidRequestError naming
the field before anything is queued (token ids checked against the vocabulary wherever
they enter, the prompt blamed when it alone overflows the context, limits); the sampler
never writes through an id outside the vocabulary."""
import pytest
import torch

from loong import LLM, SamplingParams
from loong.errors import InvalidRequestError
from loong.worker.sampler import Sampler, SamplingBatch

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, dtype="float32", device="cpu", kv_capacity_tokens=4096)


@pytest.fixture(scope="module")
def limited(tiny_path):
    from loong.config import RequestLimits
    return LLM(tiny_path, dtype="float32", device="cpu", kv_capacity_tokens=4096,
               limits=RequestLimits(max_prompt_chars=2000, max_chat_messages=3,
                                    max_stop_strings=2, max_request_id_len=16))


def rejects(llm, field, prompts, params=None):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompts, params)
    assert e.value.field == field, e.value
    assert not llm.engine.has_unfinished()          # nothing was queued
    return str(e.value)


def test_stop_token_id_outside_vocabulary_is_rejected(llm):
    """Was: passed validation, then the min-tokens mask wrote -inf at row * V + id: an
    index error that ended the engine (or, below the buffer's end, another row)."""
    vocab = llm.engine.model_config.vocab_size
    msg = rejects(llm, "stop_token_ids", ["hello", "world"],
                  SamplingParams(stop_token_ids=[3, vocab + 7], min_tokens=1, max_tokens=4))
    assert str(vocab + 7) in msg and f"[0, {vocab})" in msg
    out = llm.generate("hello", SamplingParams(stop_token_ids=[vocab - 1], min_tokens=1,
                                               max_tokens=4, **GREEDY))[0]
    assert len(out.token_ids) == 4


def test_prompt_longer_than_context_blames_the_prompt(llm):
    ctx = llm.engine.max_model_len
    msg = rejects(llm, "prompt", [[5] * ctx], SamplingParams(max_tokens=1))
    assert "shorten the prompt" in msg
    msg = rejects(llm, "max_tokens", [[5] * 10], SamplingParams(max_tokens=ctx))
    assert f"at most {ctx - 10}" in msg


def test_limits_name_field_and_limit(limited):
    llm = limited
    assert "limit is 2000" in rejects(llm, "prompt", ["x" * 2001])
    assert "limit is 2" in rejects(llm, "stop", ["hi"], SamplingParams(stop=["a", "b", "c"]))
    with pytest.raises(InvalidRequestError) as e:
        llm.chat([{"role": "user", "content": "a"}] * 4)
    assert e.value.field == "messages" and "limit is 3" in str(e.value)
    eng = llm.engine
    for bad in ("x" * 17, "a b", "line\nforged", "nul\x00"):
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request("hi", SamplingParams(max_tokens=1), request_id=bad)
        assert e.value.field == "request_id"
    assert not eng.has_unfinished()


def test_a_later_prompt_that_cannot_fit_queues_nothing(tiny_path):
    small = LLM(tiny_path, dtype="float32", device="cpu", kv_capacity_tokens=256)
    with pytest.raises(InvalidRequestError) as e:
        small.generate([[5] * 10, [6] * 300], SamplingParams(max_tokens=2))
    assert e.value.field == "prompt"
    assert not small.engine.has_unfinished() and small.engine.executor.worker.pool.num_used == 0


def test_sampler_drops_ids_outside_the_vocabulary():
    """An out-of-range masked id must not land in another row (row * V + id)."""
    vocab = 8
    logits = torch.zeros(2, vocab)
    logits[1, 1] = 5.0                       # row 1's argmax: token 1 = vocab + 1 - vocab
    batch = SamplingBatch.from_params(
        [SamplingParams(min_tokens=1, stop_token_ids=[vocab + 1], **GREEDY),
         SamplingParams(**GREEDY)],
        output_token_ids=[[], []])
    out = Sampler()(logits.clone(), batch)
    assert out.token_ids[1] == 1
    huge = SamplingBatch.from_params([SamplingParams(min_tokens=1, stop_token_ids=[10**9],
                                                     repetition_penalty=1.5, **GREEDY)],
                                     output_token_ids=[[10**9]], prompt_token_ids=[[-3, 2]])
    logits = torch.arange(vocab, dtype=torch.float32).unsqueeze(0)
    assert Sampler()(logits, huge).token_ids == [vocab - 1]
