"""Sampler: greedy exactness, sampling statistics, truncations, penalties, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from loong.sampling_params import SamplingParams
from loong.worker.sampler import (Sampler, SamplingBatch, apply_min_p, apply_penalties,
                                  apply_top_k_top_p, make_generator, plain_greedy)

N_DRAWS = 20000


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int = N_DRAWS, **kw):
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    batch = SamplingBatch.from_params([params] * n, **kw)
    out = _sampler()(logits, batch)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[1]).double() / n


def _assert_matches(freq: torch.Tensor, expected: torch.Tensor, n: int = N_DRAWS):
    expected = expected.double()
    assert float((freq - expected).abs().max()) < 0.015
    assert float(freq[expected == 0].sum()) == 0.0          # impossible tokens never drawn
    keep = expected > 0
    chi2 = float((((freq - expected) ** 2)[keep] / expected[keep]).sum() * n)
    df = int(keep.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10           # far beyond any p=1e-4 quantile


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])


# ---------------------------------------------------------------- greedy
def test_greedy_fast_path_is_argmax_with_lowest_tie():
    logits = torch.randn(7, 1000, generator=torch.Generator().manual_seed(1))
    logits[3, 10] = logits[3, 500] = 100.0                  # tie: lowest id wins
    batch = SamplingBatch.from_params([SamplingParams(temperature=0.0)] * 7)
    assert batch.all_greedy and not batch.do_penalties and not batch.do_masks
    out = Sampler()(logits, batch)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 10
    assert out.logprobs == [None] * 7 and out.top_logprobs == [None] * 7


@pytest.mark.parametrize("params,outs,plain", [
    ([SamplingParams(temperature=0.0)] * 3, [[], [1], [1, 2]], True),
    ([SamplingParams(temperature=0.0, top_k=3, top_p=0.2, seed=5)], [[]], True),
    ([SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])], [[1, 2]], True),
    ([SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])], [[1]], False),
    ([SamplingParams(temperature=0.0), SamplingParams(temperature=0.5)], [[], []], False),
    ([SamplingParams(temperature=0.0, logprobs=0)], [[]], False),
    ([SamplingParams(temperature=0.0, repetition_penalty=1.3)], [[4]], False),
    ([SamplingParams(temperature=0.0, presence_penalty=0.5)], [[4]], False),
])
def test_plain_greedy_is_exactly_when_the_hot_path_applies(params, outs, plain):
    """Callers skip building the batch where `plain_greedy` holds: it must hold only where
    the full pipeline gives the same tokens and no logprobs."""
    assert plain_greedy(params, outs) is plain
    logits = torch.randn(len(params), 50, generator=torch.Generator().manual_seed(3))
    logits[:, 7] = logits[:, 4] = 50.0              # stop id 7 ties with id 4 at the top
    batch = SamplingBatch.from_params(params, output_token_ids=outs, prompt_token_ids=outs,
                                      eos_token_ids=(9,))
    if plain:
        full = _sampler()(logits, batch)
        fast = Sampler().greedy(logits)
        assert fast.token_ids == full.token_ids == logits.argmax(-1).tolist()
        assert fast.logprobs == full.logprobs == [None] * len(params)
    else:
        assert (not batch.all_greedy or batch.do_penalties or batch.do_masks
                or batch.max_num_logprobs >= 0)


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=0.0, top_p=0.1), SamplingParams(seed=4, min_p=0.1),
              SamplingParams(temperature=0.0, top_k=3), SamplingParams(top_p=0.5)]
    out = _sampler()(logits, SamplingBatch.from_params(params))
    for i in (0, 2, 4):
        assert out.token_ids[i] == int(logits[i].argmax())
    assert all(0 <= t < 300 for t in out.token_ids)


def test_sampler_does_not_modify_logits():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, top_k=3,
                             min_tokens=2)] * 3
    _sampler()(logits, SamplingBatch.from_params(params, output_token_ids=[[1]] * 3,
                                                 prompt_token_ids=[[2]] * 3,
                                                 eos_token_ids=[0]))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_frequencies_match_softmax(temperature):
    freq = _draw(LOGITS, SamplingParams(temperature=temperature))
    _assert_matches(freq, torch.softmax(LOGITS / temperature, -1))


def test_top_k_renormalises_and_never_leaves_top_k():
    freq = _draw(LOGITS, SamplingParams(top_k=3, temperature=0.8))
    expected = torch.zeros_like(LOGITS)
    top = LOGITS.topk(3).indices
    expected[top] = torch.softmax(LOGITS[top] / 0.8, -1)
    _assert_matches(freq, expected)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.4, 0.04, 0.3, 0.2, 0.01])
    logits = probs.log()
    # 0.4 + 0.3 = 0.7 < 0.75, so 0.2 joins: {1, 3, 4} (mass 0.9).
    masked = apply_top_k_top_p(logits.unsqueeze(0), None, torch.tensor([0.75]))[0]
    assert torch.isfinite(masked).tolist() == [False, True, False, True, True, False]
    assert torch.equal(masked[[1, 3, 4]], logits[[1, 3, 4]])      # kept values untouched
    masked = apply_top_k_top_p(logits.unsqueeze(0), None, torch.tensor([0.65]))[0]
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [1, 3]
    masked = apply_top_k_top_p(logits.unsqueeze(0), None, torch.tensor([0.01]))[0]
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [1]   # top-1 always kept
    freq = _draw(logits, SamplingParams(top_p=0.75))
    expected = torch.zeros(6)
    expected[[1, 3, 4]] = probs[[1, 3, 4]] / 0.9
    _assert_matches(freq, expected)


def test_top_k_and_top_p_per_row_and_off_rows_untouched():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    top_k = torch.tensor([0, 5, 64, 1000])
    top_p = torch.tensor([1.0, 1.0, 0.3, 1.0])
    out = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[3], logits[3])
    assert int(torch.isfinite(out[1]).sum()) == 5
    assert set(torch.isfinite(out[1]).nonzero().flatten().tolist()) == set(
        logits[1].topk(5).indices.tolist())
    p = torch.softmax(logits[2], -1).sort(descending=True).values
    n_keep = int((p.cumsum(0) < 0.3).sum()) + 1
    assert int(torch.isfinite(out[2]).sum()) == n_keep


def _reference_keep(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Top-k then top-p by the book, in float64, one row."""
    vals = row.double().sort(descending=True).values
    if k > 0:
        vals = vals[:k]
    probs = torch.softmax(vals, -1)
    n = len(vals) if p >= 1.0 else int((probs.cumsum(0) - probs < p).sum())
    return row >= vals[n - 1].float()


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])   # flat rows need the full-sort fallback
def test_top_k_top_p_match_reference(scale):
    g = torch.Generator().manual_seed(6)
    v = 3000
    logits = torch.randn(6, v, generator=g) * scale
    top_k = torch.tensor([0, 10, 0, 2000, 300, 1])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.95, 0.99, 0.3])
    out = apply_top_k_top_p(logits, top_k, top_p)
    for i in range(6):
        expected = _reference_keep(logits[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(torch.isfinite(out[i]), expected), i
        assert torch.equal(out[i][expected], logits[i][expected])
    only_k = apply_top_k_top_p(logits, top_k, None)
    for i in range(6):
        assert torch.equal(torch.isfinite(only_k[i]), _reference_keep(logits[i], int(top_k[i]), 1.0))


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.2, 0.09, 0.11, 0.1])
    logits = probs.log()
    masked = apply_min_p(logits.unsqueeze(0), torch.tensor([0.21]))[0]
    # threshold 0.21 * 0.5 = 0.105: drops 0.09 and 0.1
    assert torch.isfinite(masked).tolist() == [True, True, False, True, False]
    freq = _draw(logits, SamplingParams(min_p=0.21))
    expected = torch.tensor([0.5, 0.2, 0.0, 0.11, 0.0]) / 0.81
    _assert_matches(freq, expected)


def test_seeded_rows_sample_the_right_distribution():
    n = 4000
    params = [SamplingParams(seed=s, temperature=0.9) for s in range(n)]
    logits = LOGITS.unsqueeze(0).expand(n, -1).contiguous()
    out = Sampler()(logits, SamplingBatch.from_params(params))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=8).double() / n
    assert float((freq - torch.softmax(LOGITS / 0.9, -1)).abs().max()) < 0.035


# ---------------------------------------------------------------- min_tokens masking
def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(4, 10)
    logits[:, 2] = 50.0        # EOS would win
    logits[:, 7] = 40.0        # stop token id next
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7]),
              SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7]),
              SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),
              SamplingParams(min_tokens=1, stop_token_ids=[7], temperature=0.5)]
    outs = [[1, 1], [1, 1, 1], [], []]
    batch = SamplingBatch.from_params(params, output_token_ids=outs, eos_token_ids=[2])
    assert list(batch.masked_token_ids[0]) == [7, 2] and list(batch.masked_token_ids[1]) == []
    assert list(batch.masked_token_ids[2]) == []       # ignore_eos and no stop ids
    out = _sampler()(logits, batch)
    assert out.token_ids[:3] == [0, 2, 2]      # row 0: 2 and 7 masked, tie at 0 -> 0
    assert out.token_ids[3] not in (2, 7)


# ---------------------------------------------------------------- penalties
def test_penalties_follow_the_formulas_exactly():
    v = 12
    logits = torch.linspace(-3.0, 3.0, v).repeat(3, 1)
    params = [SamplingParams(repetition_penalty=1.5, temperature=0.0, logprobs=0),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, logprobs=0),
              SamplingParams(logprobs=0)]
    prompts = [[0, 1, 11], [0, 1, 11], [0, 1]]
    outputs = [[2, 10, 10], [2, 10, 10, 10], [3]]
    batch = SamplingBatch.from_params(params, prompt_token_ids=prompts, output_token_ids=outputs)
    got = apply_penalties(logits.clone(), batch)
    exp = logits.clone()
    for t in {0, 1, 11, 2, 10}:     # repetition: prompt and output, HF semantics
        x = logits[0, t]
        exp[0, t] = x / 1.5 if x > 0 else x * 1.5
    exp[1, 2] -= 0.7 + 0.3 * 1      # presence/frequency: output tokens only
    exp[1, 10] -= 0.7 + 0.3 * 3
    assert torch.allclose(got, exp, atol=1e-6, rtol=0)
    assert torch.equal(got[2], logits[2])              # no penalties: bit-exact
    assert torch.equal(got[1, [0, 1, 11]], logits[1, [0, 1, 11]])   # prompt not penalised
    out = _sampler()(logits, batch)
    raw = torch.log_softmax(logits, -1)        # logprobs are raw: before the penalties
    assert out.token_ids[0] == int(exp[0].argmax())
    for i in range(3):
        assert out.logprobs[i] == pytest.approx(float(raw[i, out.token_ids[i]]), abs=1e-5)
    assert out.logprobs[0] != pytest.approx(float(torch.log_softmax(exp, -1)[0, out.token_ids[0]]),
                                            abs=1e-3)


def test_repetition_penalty_in_all_greedy_batch_changes_argmax():
    logits = torch.tensor([[5.0, 4.0, -1.0], [5.0, 4.0, -1.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0),
              SamplingParams(temperature=0)]
    batch = SamplingBatch.from_params(params, prompt_token_ids=[[0], [0]],
                                      output_token_ids=[[], []])
    assert _sampler()(logits, batch).token_ids == [1, 0]     # 5/2 < 4


# ---------------------------------------------------------------- seeds
def _seeded_sequence(seed, position, others, steps=8, v=40):
    g = torch.Generator().manual_seed(100)
    outs: list[list[int]] = [[] for _ in range(len(others) + 1)]
    sampler = Sampler(torch.Generator().manual_seed(len(others)))
    for _ in range(steps):
        rows = list(others)
        rows.insert(position, SamplingParams(seed=seed, temperature=1.0))
        logits = torch.randn(len(rows), v, generator=g)
        logits[position] = torch.linspace(0, 1, v)          # same logits for the seeded row
        batch = SamplingBatch.from_params(rows, output_token_ids=outs)
        out = sampler(logits, batch)
        for i, t in enumerate(out.token_ids):
            outs[i].append(t)
    return outs[position]


def test_same_seed_same_tokens_whatever_the_batch():
    others_a = [SamplingParams(top_k=3), SamplingParams(temperature=0.0)]
    others_b = [SamplingParams(seed=9, top_p=0.5), SamplingParams(min_p=0.2),
                SamplingParams(presence_penalty=1.0, temperature=0.3)]
    ref = _seeded_sequence(1234, 0, [])
    assert _seeded_sequence(1234, 0, []) == ref
    assert _seeded_sequence(1234, 1, others_a) == ref
    assert _seeded_sequence(1234, 2, others_a) == ref
    assert _seeded_sequence(1234, 3, others_b) == ref
    assert _seeded_sequence(1235, 0, []) != ref
    assert len(set(ref)) > 2


def test_explicit_stateful_generators_are_reproducible():
    params = [SamplingParams(seed=5), SamplingParams(), SamplingParams(seed=6)]

    def run(order):
        gens = {0: torch.Generator().manual_seed(5), 2: torch.Generator().manual_seed(6)}
        seq = []
        for _ in range(6):
            batch = SamplingBatch.build([params[i] for i in order], None, None,
                                        [gens.get(i) for i in order], [])
            out = Sampler()(torch.zeros(len(order), 50), batch)
            seq.append({i: out.token_ids[j] for j, i in enumerate(order)})
        return [(s[0], s[2]) for s in seq]

    assert run([0, 1, 2]) == run([2, 0, 1]) == run([2, 0])


def test_make_generator_depends_on_seed_and_step():
    a = torch.rand(4, generator=make_generator(7, 3))
    assert torch.equal(a, torch.rand(4, generator=make_generator(7, 3)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(7, 4)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(8, 3)))
    make_generator(2**64 - 1, 0)
    make_generator(-(2**63), 5)


# ---------------------------------------------------------------- logprobs
def test_logprobs_equal_log_softmax_and_top_n():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(logprobs=5, temperature=0.0), SamplingParams(logprobs=0),
              SamplingParams(), SamplingParams(logprobs=20, temperature=0.5, top_k=3)]
    out = _sampler()(logits, SamplingBatch.from_params(params))
    lp = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    assert out.top_logprobs[1] == []
    for i in (0, 1, 3):
        assert out.logprobs[i] == pytest.approx(float(lp[i, out.token_ids[i]]), abs=1e-6)
    top0 = out.top_logprobs[0]
    assert [t for t, _ in top0] == lp[0].topk(5).indices.tolist()
    assert [x for _, x in top0] == pytest.approx(lp[0].topk(5).values.tolist(), abs=1e-6)
    assert top0[0][0] == out.token_ids[0]
    assert len(out.top_logprobs[3]) == 20      # before top-k: the model's distribution
    assert all(b[1] <= a[1] for a, b in zip(out.top_logprobs[3], out.top_logprobs[3][1:]))


def test_logprobs_with_min_tokens_mask_stay_finite():
    logits = torch.tensor([[10.0, 1.0, 0.0]])
    batch = SamplingBatch.from_params([SamplingParams(temperature=0, min_tokens=1, logprobs=2)],
                                      output_token_ids=[[]], eos_token_ids=[0])
    out = _sampler()(logits, batch)
    assert out.token_ids == [1]
    assert all(math.isfinite(x) for _, x in out.top_logprobs[0])
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[0, 1]))


def test_real_vocab_size_mixed_batch_smoke():
    v = 49152
    logits = torch.randn(5, v, generator=torch.Generator().manual_seed(11)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(top_p=0.9, top_k=50),
              SamplingParams(min_p=0.05, seed=1), SamplingParams(repetition_penalty=1.1),
              SamplingParams(logprobs=3, temperature=0.7)]
    out = _sampler()(logits, SamplingBatch.from_params(
        params, prompt_token_ids=[[1, 2, 3]] * 5, output_token_ids=[[4]] * 5))
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in logits[1].topk(50).indices.tolist()
    assert all(0 <= t < v for t in out.token_ids)


def test_bad_shape_rejected():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(3, 5), SamplingBatch.from_params([SamplingParams()] * 2))
