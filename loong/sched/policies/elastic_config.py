"""ElasticConfig: the options of LoongServe's four scheduling steps (`ElasticPolicy`).

Owns only the options and their meaning; the planners that read them are `elastic.py`,
`elastic_dispatch.py` and `elastic_consolidate.py`. Imports nothing of loong; never torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ElasticConfig:
    max_ooe: int = 8                  # waiting requests one dispatch may skip over
    max_new_per_step: int = 48        # requests one dispatch admits at most (DP size)
    max_wait_steps: int = 10          # decode steps between two prefills that pause decodes
    max_prefill_time_ms: float = 5000.0   # predicted batch prefill time (first request exempt)
    initial_avg_output: float = 512.0     # output length assumed until a request finishes
    max_head_defer: int = 64          # dispatches the queue head may be passed over
    migrate: bool = True              # consolidate decode KV to free an instance for prefill
    max_consolidations: int = 4       # instances one schedule() may free by migration
    dp_exact_cells: int = 48          # exact DP when requests x instances <= this
