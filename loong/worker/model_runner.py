"""ModelRunner: turns a StepPlan into tensors, runs the model on one instance, samples.

A failure while running one request (a bad value, a kernel error on its rows) ends only
that request: the step is retried request by request and the culprit is reported in
`StepResult.failed`; sampling isolates failing rows the same way (`sample_requests`).

Owns: the model replica, its KV cache pool, per-request sampling state (parameters,
seeded generator, token history for penalties), and the plan -> tensors translation.
It never decides what to run: that is the policy's job (`loong.sched`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loong.attention.paged_context import PagedAttention, PrefillSegment, StepAttentionMetadata
from loong.kv.cache_pool import KVCachePool, slots_for
from loong.model.llama import LlamaModel
from loong.sampling_params import SamplingParams
from loong.sched.plan import ScheduledChunk, StepPlan, StepResult
from loong.worker import faults
from loong.worker.sampler import Sampler, SamplingBatch


@dataclass
class RunnerRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCachePool, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        self.block_size = cache.block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.scale = model.cfg.head_dim ** -0.5
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequest] = {}

    # ----- per-request sampling state ------------------------------------------------
    def add_request(self, request_id: str, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        # Seeded rows get a generator derived from (seed, output index) by the sampler, so
        # a request samples the same tokens whatever its batch and after preemption.
        self.requests[request_id] = RunnerRequest(params, list(prompt_token_ids))

    def remove_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    # ----- one step ------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. An error is isolated to the requests at fault: the chunks run
        again one by one, and a chunk that fails alone marks its request `failed`."""
        result = StepResult(plan.step)
        if plan.is_empty:
            return result
        try:
            self._run(plan.chunks, result)
        except Exception as e:               # noqa: BLE001 - find the requests at fault
            if len(plan.chunks) == 1:
                result.failed[plan.chunks[0].request_id] = f"{type(e).__name__}: {e}"
                return result
            for chunk in plan.chunks:
                try:
                    self._run([chunk], result)
                except Exception as e:       # noqa: BLE001 - this request only
                    result.failed[chunk.request_id] = f"{type(e).__name__}: {e}"
        return result

    def _run(self, chunks: list[ScheduledChunk], result: StepResult) -> None:
        """Forward and sample `chunks` (decodes first), filling `result`."""
        for chunk in chunks:
            faults.check("forward", chunk.token_ids, "the forward pass")
        ids, positions, meta, sample_rows, dyn = prepare_chunks(chunks, self.block_size,
                                                                self.device)
        attn = PagedAttention(self.cache, meta, self.scale)
        hidden = self.model(ids, positions, attn, dyn if self.model.rope.dynamic else None)
        if not sample_rows:
            return
        logits = self.model.logits(hidden[sample_rows])
        sampled_chunks = [c for c in chunks if c.sample]
        reqs = [self.requests[c.request_id] for c in sampled_chunks]
        for chunk, row in zip(sampled_chunks, sample_requests(
                self.sampler, logits, reqs, self.eos_token_ids)):
            if row.error is not None:
                result.failed[chunk.request_id] = row.error
                continue
            result.sampled[chunk.request_id] = row.token
            if row.logprobs is not None:
                result.logprobs[chunk.request_id] = row.logprobs


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
    batch = SamplingBatch.from_params(
        [r.params for r in reqs], prompt_token_ids=[r.prompt_token_ids for r in reqs],
        output_token_ids=[r.output_token_ids for r in reqs], eos_token_ids=eos_token_ids,
        device=logits.device)
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


def prepare_chunks(chunks: list[ScheduledChunk], block_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, StepAttentionMetadata, list[int],
                              list[tuple[int, int, int]]]:
    """One step's chunks (decodes first, then prefill chunks) as the flat token batch:
    (token ids, positions, attention metadata, rows to sample, rope ranges). Shared by
    `ModelRunner` and an instance's replica step (`loong.worker.replica_step`)."""
    bs, dev = block_size, device
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    dyn_ranges: list[tuple[int, int, int]] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillSegment] = []
    for chunk in chunks:
        row0 = len(ids)
        n = chunk.num_tokens
        end = chunk.start + n
        ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, end))
        table = chunk.block_ids
        slots.extend(slots_for(table, chunk.start, end, bs))
        dyn_ranges.append((row0, row0 + n, end))
        if chunk.sample:
            sample_rows.append(row0 + n - 1)
        if chunk.is_decode and not prefills:
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefills.append(PrefillSegment(row0, row0 + n, chunk.start,
                                           torch.tensor(table, dtype=torch.int32)))
    nd = len(decode_lens)
    tables = lens = None
    if nd:
        width = max(len(t) for t in decode_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                              dtype=torch.int32, device=dev)
        lens = torch.tensor(decode_lens, dtype=torch.int32, device=dev)
    if dev.type != "cpu":
        for seg in prefills:
            seg.block_table = seg.block_table.to(dev)
    meta = StepAttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), nd,
                                 tables, lens, prefills)
    return (torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev), meta, sample_rows, dyn_ranges)
