"""Stop conditions: token-level finish reasons and streaming stop-string handling."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from loong.engine.stop_checker import (StopStringChecker, check_stop,
                                       check_stop_reason, find_stop_string, partial_stop_len)
from loong.sampling_params import SamplingParams

EOS = 2


# ---------------------------------------------------------------- check_stop
def test_eos_and_stop_token_ids():
    p = SamplingParams(max_tokens=10, stop_token_ids=[7])
    assert check_stop(EOS, 1, p, [EOS]) == "stop"
    assert check_stop(EOS, 1, p, EOS) == "stop"             # a bare int works too
    assert check_stop(EOS, 1, p, {EOS, 3}) == "stop"
    assert check_stop(7, 3, p, [EOS]) == "stop"
    assert check_stop(5, 3, p, [EOS]) is None
    assert check_stop(EOS, 1, p, None) is None


def test_ignore_eos_keeps_stop_token_ids():
    p = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[7])
    assert check_stop(EOS, 1, p, [EOS]) is None
    assert check_stop(7, 1, p, [EOS]) == "stop"


def test_min_tokens_defers_stop_tokens():
    p = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[7])
    for n in (1, 2, 3):                  # the first min_tokens tokens never stop
        assert check_stop(EOS, n, p, [EOS]) is None
        assert check_stop(7, n, p, [EOS]) is None
    assert check_stop(EOS, 4, p, [EOS]) == "stop"
    assert check_stop(7, 4, p, [EOS]) == "stop"


def test_length():
    p = SamplingParams(max_tokens=3)
    assert check_stop(5, 2, p, [EOS]) is None
    assert check_stop(5, 3, p, [EOS]) == "length"
    assert check_stop(EOS, 3, p, [EOS]) == "stop"           # a stop token wins
    assert check_stop(5, 3, SamplingParams(max_tokens=3, min_tokens=3), [EOS]) == "length"
    q = SamplingParams(max_tokens=100)
    assert check_stop(5, 4, q, [EOS], num_prompt_tokens=10, max_model_len=14) == "length"
    assert check_stop(5, 3, q, [EOS], num_prompt_tokens=10, max_model_len=14) is None


def test_check_stop_reason_reports_stop_token_id():
    p = SamplingParams(max_tokens=5, stop_token_ids=[7])
    assert check_stop_reason(7, 1, p, [EOS]) == ("stop", 7)
    assert check_stop_reason(EOS, 1, p, [EOS]) == ("stop", None)
    assert check_stop_reason(3, 5, p, [EOS]) == ("length", None)
    assert check_stop_reason(3, 1, p, [EOS]) == (None, None)


# ---------------------------------------------------------------- pure helpers
def test_find_stop_string_earliest_end_and_include():
    text = "hello world. Bye"
    assert find_stop_string(text, len(text), ["Bye", "."]) == (".", 11)
    assert find_stop_string(text, len(text), ["Bye", "."], True) == (".", 12)
    assert find_stop_string(text, 4, ["Bye", "."]) == ("Bye", 13)
    assert find_stop_string(text, 4, ["Bye", "."], True) == ("Bye", 16)
    assert find_stop_string("xabc", 4, ["abc", "b"]) == ("b", 2)        # "b" completes first
    assert find_stop_string("xabc", 4, ["bc", "abc"]) == ("abc", 1)     # same end: longest
    assert find_stop_string(text, 0, ["Bye"]) is None
    assert find_stop_string(text, 3, []) is None


def test_find_stop_string_searches_only_the_new_tail():
    text = "STOP and more text"
    assert find_stop_string(text, 5, ["STOP"]) is None      # old match: not searched again
    # A match that straddles the old text and the new delta is found.
    assert find_stop_string("abcST" + "OPxy", 4, ["STOP"]) == ("STOP", 3)
    assert find_stop_string("abcSTOP", 1, ["STOP"]) == ("STOP", 3)
    assert find_stop_string("abcSTOPx", 1, ["STOP"]) is None


def test_partial_stop_len():
    assert partial_stop_len("hello ##", ["###"]) == 2
    assert partial_stop_len("hello #", ["###", "#END"]) == 1
    assert partial_stop_len("hello #E", ["###", "#END"]) == 2
    assert partial_stop_len("hello", ["###"]) == 0
    assert partial_stop_len("ab", ["abc"]) == 2
    assert partial_stop_len("", ["abc"]) == 0
    assert partial_stop_len("abc", ["abc"]) == 0            # complete, not a proper prefix


# ---------------------------------------------------------------- streaming
def _reference(text: str, stop: list[str], include: bool) -> str:
    """Character-by-character reference: stop at the first position where a stop completes."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end] if include else text[:end - len(s)]
    return text


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(0, 5)
        out.append(text[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("include", [False, True])
def test_streaming_matches_reference_for_any_chunking(include):
    rng = random.Random(0)
    alphabet = "ab#\n中"
    stops_pool = [["##"], ["ab#"], ["#", "aa"], ["\n\n", "中中"], ["abab", "ba"], ["a#b#"]]
    for trial in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = rng.choice(stops_pool)
        checker = StopStringChecker(stop, include)
        shown, stopped = "", False
        final = _reference(text, stop, include)
        for chunk in _chunks(text, rng):
            res = checker.append(chunk)
            shown += res.delta
            assert final.startswith(shown), (trial, text, stop)   # never shows too much
            if res.stopped:
                stopped = True
                assert res.stop_str in stop
                break
        if not stopped:
            shown += checker.flush()
        assert shown == final == checker.text, (trial, text, stop)
        assert stopped == any(s in text for s in stop)


def test_hold_back_then_release():
    c = StopStringChecker(["</s>"])
    assert c.append("Hello <").delta == "Hello "
    assert c.append("/").delta == ""
    res = c.append("x more")
    assert res.delta == "</x more" and not res.stopped
    assert c.append(" </").delta == " "
    assert c.flush() == "</"
    assert c.text == "Hello </x more </"


def test_stop_truncates_and_ignores_later_text():
    c = StopStringChecker("END", include_stop_str_in_output=False)
    assert c.append("abc E").delta == "abc "
    res = c.append("ND tail")
    assert res.stopped and res.stop_str == "END" and res.delta == ""
    assert c.text == "abc "
    assert c.append("more").delta == "" and c.stopped
    c = StopStringChecker(["END"], include_stop_str_in_output=True)
    assert c.append("abc EN").delta == "abc "
    res = c.append("D tail")
    assert res.stopped and res.delta == "END" and c.text == "abc END"


def test_allow_stop_false_defers_detection():
    c = StopStringChecker(["x"])
    res = c.append("axb", allow_stop=False)
    assert not res.stopped and res.delta == "axb"
    res = c.append("cxd")
    assert res.stopped and c.text == "axbc"


def test_from_params_and_no_stops():
    c = StopStringChecker.from_params(SamplingParams(stop="\n\n", include_stop_str_in_output=True))
    assert c.stop == ("\n\n",) and c.include_stop_str_in_output
    c = StopStringChecker(None)
    assert c.append("anything at all").delta == "anything at all" and c.flush() == ""


def test_feed_pair_form():
    m = StopStringChecker(["##"], False)
    assert m.feed("ab#") == ("ab", None)
    assert m.feed("#cd") == ("", "##")
    assert m.text == "ab"


def test_pure_python_module():
    code = ("import sys; import loong.engine.stop_checker, loong.engine.detokenizer; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
