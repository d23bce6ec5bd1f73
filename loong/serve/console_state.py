"""The live console's JSON (`GET /console/state`): the cluster as it runs, in one object.

Owns: what the console draws, from `ServerStats` (never the engine): each instance's KV
blocks (used by running requests, cached, free) and alive state, the groups of the step
just run (which instances prefill which requests with ring attention, which decode with
which masters), queue lengths, tokens/s, TTFT/TPOT percentiles, prefix-cache counters.
Pure Python; no web framework.
"""
from __future__ import annotations

from loong.serve.server_stats import ServerStats


def console_state(stats: ServerStats, model_info: dict, preparing: int = 0) -> dict:
    d = stats.as_dict()
    return {
        "model": model_info.get("model"), "policy": model_info.get("policy"),
        "block_size": model_info.get("block_size"),
        "kv_tokens_per_instance": model_info.get("kv_tokens_per_instance"),
        "instances": d["instances"], "groups": d["groups"],
        "running": d["running"], "waiting": d["waiting"], "preparing": preparing,
        "received": d["received"], "finished": d["finished"],
        "prompt_tokens": d["prompt_tokens"], "completion_tokens": d["completion_tokens"],
        "tokens_per_s": round(stats.tokens_per_s(), 2), "latency_s": stats.percentiles(),
        "prefix_cache": d["prefix_cache"], "group_sizes": d["group_sizes"],
        "aborts": d["aborts"], "rejections": d["rejections"], "steps": d["steps"],
        "uptime_s": round(d["uptime_s"], 1),
    }
