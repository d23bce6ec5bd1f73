"""Sampling the rows of one step for the requests they belong to.

Owns: `RunnerRequest` (what an instance keeps of a request it samples: params, prompt ids,
the output ids so far, for penalties and seeded generators), `sample_requests` (one token
per row, appended to each request's history) and `SampledRow`. A failure is isolated to
its rows: the batch is sampled again row by row, and a row that still fails reports an
error instead of a token while the others go on.
Must not import: the scheduler policies, the engine, the cluster runtime or serving code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loong.sampling_params import SamplingParams
from loong.worker import faults
from loong.worker.sampler import Sampler, SamplingBatch, plain_greedy


@dataclass
class RunnerRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)


def sample_requests(sampler: Sampler, logits: torch.Tensor, reqs: list[RunnerRequest],
                    eos_token_ids: tuple[int, ...]) -> list[SampledRow]:
    """Sample one token per row of `logits` for `reqs` (row order) and append it to each
    request's history. A failure is isolated to its rows: the batch is sampled again row
    by row and a row that still fails gets `error` (and no token) while the others go on."""
    try:
        return _sample_batch(sampler, logits, reqs, eos_token_ids)
    except Exception as e:                   # noqa: BLE001 - find the rows at fault
        if len(reqs) == 1:
            return [SampledRow.failed(e)]
    out = []
    for i, req in enumerate(reqs):
        try:
            out += _sample_batch(sampler, logits[i:i + 1], [req], eos_token_ids)
        except Exception as e:               # noqa: BLE001 - this row only
            out.append(SampledRow.failed(e))
    return out


@dataclass
class SampledRow:
    """One row's outcome: the token and (logprob, top-N) or None; or why it failed."""

    token: int | None
    logprobs: tuple | None = None
    error: str | None = None

    @classmethod
    def failed(cls, e: Exception) -> "SampledRow":
        return cls(None, None, f"sampling failed: {type(e).__name__}: {e}")


def _sample_batch(sampler: Sampler, logits: torch.Tensor, reqs: list[RunnerRequest],
                  eos_token_ids: tuple[int, ...]) -> list[SampledRow]:
    for req in reqs:
        faults.check("sample", req.prompt_token_ids, "sampling")
    params = [r.params for r in reqs]
    outs = [r.output_token_ids for r in reqs]
    if plain_greedy(params, outs):
        out = sampler.greedy(logits)
    else:
        batch = SamplingBatch.from_params(
            params, prompt_token_ids=[r.prompt_token_ids for r in reqs], output_token_ids=outs,
            eos_token_ids=eos_token_ids, device=logits.device)
        out = sampler(logits, batch)
    rows = []
    for i, req in enumerate(reqs):
        lp = None
        if out.logprobs is not None and req.params.logprobs is not None:
            lp = (out.logprobs[i], out.top_logprobs[i])
        rows.append(SampledRow(out.token_ids[i], lp))
    for req, row in zip(reqs, rows):        # only once every row has its token
        req.output_token_ids.append(row.token)
    return rows
