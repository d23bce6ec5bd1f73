"""Which requests start over after a cluster reset (loong.engine.requeue)."""
from types import SimpleNamespace

from loong.engine.requeue import MAX_STRIKES, requeue_after_reset
from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams


def _state(prompt, out, max_tokens=10, held=False, strikes=0, salt=None):
    return SimpleNamespace(prompt_token_ids=prompt, output_token_ids=out, held=held,
                           strikes=strikes, params=SamplingParams(max_tokens=max_tokens,
                                                                  cache_salt=salt))


def test_requeue_strikes_held_and_too_long():
    states = {"a": _state([1, 2], [3], salt="t"), "b": _state([4], [], strikes=MAX_STRIKES - 1),
              "c": _state([5], [6], held=True), "d": _state([7] * 50, [8] * 5),
              "e": _state([9], [], strikes=0)}
    added = []

    def check(n, left):
        if n > 40:
            raise InvalidRequestError("prompt", "too long now")

    failed, aborted = requeue_after_reset(states, ["b", "e", "gone"], "boom", check,
                                          lambda k, t, s: added.append((k, t, s)))
    assert set(failed) == {"b"} and "boom" in failed["b"] and str(MAX_STRIKES) in failed["b"]
    assert states["e"].strikes == 1            # one strike: starts over
    assert aborted == ["d"]                    # no longer fits
    # every other request not held is re-added over prompt + output so far, with its salt
    assert added == [("a", [1, 2, 3], "t"), ("e", [9], None)]


def test_requeue_passes_the_tokens_left():
    seen = []
    requeue_after_reset({"a": _state([1, 2], [3, 4, 5], max_tokens=4)}, [], "x",
                        lambda n, left: seen.append((n, left)), lambda *a: None)
    assert seen == [(5, 1)]                    # at least one token left to generate
