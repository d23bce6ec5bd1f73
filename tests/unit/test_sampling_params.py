"""SamplingParams: defaults, normalisation, and validation that names the field."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from loong.errors import InvalidRequestError
from loong.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert p.seed is None and p.logprobs is None
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.is_greedy() and not p.has_penalties()


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[5, 7], top_k=-1, temperature=0)
    assert p.stop == ("###",)
    assert p.stop_token_ids == (5, 7)
    assert p.top_k == 0
    assert isinstance(p.temperature, float) and p.is_greedy()
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop=["ab", "c"]).max_stop_str_len() == 2
    assert SamplingParams(temperature=1e-7).is_greedy()
    assert SamplingParams(repetition_penalty=1.2).has_penalties()
    assert SamplingParams(presence_penalty=-0.5).has_penalties()


def test_frozen_hashable_and_replace():
    p = SamplingParams(stop=["x"], seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop="x", seed=3))
    q = dataclasses.replace(p, max_tokens=4)
    assert q.max_tokens == 4 and q.stop == ("x",)
    with pytest.raises(InvalidRequestError):
        dataclasses.replace(p, top_p=0.0)


NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_tokens", None), ("max_tokens", "16"),
    ("min_tokens", -1), ("min_tokens", 2.0),
    ("temperature", NAN), ("temperature", -0.1), ("temperature", INF), ("temperature", "1"),
    ("temperature", None), ("temperature", False),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", NAN), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", NAN),
    ("seed", 1.0), ("seed", "7"), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", True),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", NAN),
    ("repetition_penalty", INF),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", NAN),
    ("frequency_penalty", 3.0), ("frequency_penalty", NAN), ("frequency_penalty", -INF),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5),
    ("stop", ["x"] * 17),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_min_tokens_bounded_by_max_tokens():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.field == "min_tokens"
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=2), dict(top_p=1e-6), dict(top_k=1),
    dict(top_k=100000), dict(min_p=1.0), dict(seed=0), dict(seed=-(2**63)),
    dict(seed=2**64 - 1), dict(repetition_penalty=1e-3), dict(presence_penalty=-2),
    dict(frequency_penalty=2.0), dict(logprobs=0), dict(logprobs=MAX_LOGPROBS),
    dict(stop=("a", "b")), dict(stop_token_ids=[0]), dict(max_tokens=1),
])
def test_valid_edges(kwargs):
    SamplingParams(**kwargs)


def test_no_torch_import():
    code = ("import sys; import loong.sampling_params; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
