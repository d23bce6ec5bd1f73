"""LoongServe's Figure 12 SLO: per-request attainment with a TTFT limit that scales with
the prompt (loongserve-mechanics.md section 4, perf-reliability-anchors.md).

A request attains the SLO when TTFT <= max(25 x the cost model's predicted single-request
prefill time at SP4 (a group of 4 instances), 15 s) and TPOT <= 50 ms; a request with one
output token has no TPOT and meets that limit. The reported rate is where the share of
requests that attain it falls below 90% (`loong.sched.metrics.rate_at_attainment`).
Unlike the normalized mean latencies of Figures 10 and 11, attainment does not level off
on a finite trace: a queue of a few minutes fails most requests whatever their length.

Pure Python (the cost model's predictions only); never imports torch.
"""
from __future__ import annotations

from typing import Sequence

from loong.sched.cost_model import CostModel
from loong.sched.metrics import RequestRecord

TTFT_FACTOR = 25.0          # x the predicted single-request prefill time ...
TTFT_FLOOR_S = 15.0         # ... but at least this
SLO_GROUP = 4               # that prediction is at SP4 (4 TP2 instances)
TPOT_S = 0.050
TARGET = 0.9


def ttft_limit_s(cost: CostModel, prompt_len: int) -> float:
    """The TTFT limit for a prompt: max(25 x predicted SP4 prefill, 15 s)."""
    return max(TTFT_FACTOR * cost.prefill_ms(SLO_GROUP, [prompt_len]) / 1e3, TTFT_FLOOR_S)


def attains(record: RequestRecord, cost: CostModel) -> tuple[bool, bool]:
    """(TTFT within its limit, TPOT <= 50 ms) for one request."""
    tpot = record.tpot
    return (record.ttft <= ttft_limit_s(cost, record.prompt_len),
            tpot is None or tpot <= TPOT_S)


def attainment(records: Sequence[RequestRecord], cost: CostModel) -> dict:
    """Share of requests meeting both limits ("attainment"), and of those meeting each one
    ("ttft_ok", "tpot_ok")."""
    if not records:
        raise ValueError("records must be non-empty")
    flags = [attains(r, cost) for r in records]
    n = len(flags)
    return {"attainment": sum(t and p for t, p in flags) / n,
            "ttft_ok": sum(t for t, _ in flags) / n,
            "tpot_ok": sum(p for _, p in flags) / n}


def describe() -> dict:
    """The SLO's parameters, JSON-ready (for result files)."""
    return {"ttft": f"max({TTFT_FACTOR:g} x prefill_ms({SLO_GROUP}, [prompt]), {TTFT_FLOOR_S:g} s)",
            "tpot_s": TPOT_S, "target": TARGET}
