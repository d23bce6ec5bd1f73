"""Offline throughput: Loong vs transformers `generate` on one fixed workload, same machine, bf16.

Workload (fixed seed): --num-prompts prompts (default 64) with lengths uniform in
[--min-len, --max-len] (default 128-1024) tokens, --output-len (default 128) output tokens each,
greedy, EOS ignored. Prompts are token windows of L-Eval documents (`../shared/data/leval`,
field `input`) when that folder exists, else deterministic synthetic ids. Both systems get
the same token ids.

Each system runs once, in its own subprocess (so its peak RSS is its own):
- Loong: `LLM(...).engine` driven step by step; every step is timed and classified by its plan
  (decode-only / prefill-only / mixed). Main run = the whole workload (end-to-end tokens/s,
  decode tokens/s from decode-only steps with >= 32 requests). Then a prefill-only pass (same
  prompts with another first token, so no KV cached by the main run is reused; max_tokens=1)
  gives prefill tokens/s.
- transformers: static batches of --batch-size (default 32) prompts in workload order, left
  padding + attention mask, `generate` (greedy, no EOS). Main pass = every batch with the
  full output length; prefill pass = every batch with max_new_tokens=1. decode tokens/s =
  B*(output_len-1) / (generate time - prefill time), over batches of >= 32 prompts.

Printed and written to JSON: the three rates and their Loong/transformers ratios; each phase
as a share of the CPU's bf16 matmul limit (2048^3 torch.matmul, median, measured before and
after the runs in the parent process) counted two ways (FLOPs each system executes, and the
useful FLOPs the workload needs, identical for both); KV memory allocated / in use / holding
tokens; peak RSS per system; pass/fail against the goals. See experiments/README.md.

Usage: python experiments/offline_throughput.py [--quick] [--loong-only | --hf-only]
           [--num-prompts N] [--min-len N] [--max-len N] [--output-len N] [--batch-size N]
           [--threads N] [--max-num-seqs N] [--max-num-batched-tokens N]
           [--kv-capacity-tokens N] [--seed N] [--synthetic] [--json PATH]
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402

LEVAL_DIR = os.path.join(REPO, "..", "shared", "data", "leval")
DEFAULT_JSON = os.path.join(HERE, "results", "offline_throughput.json")
FRESH_TOKEN = 1000        # the first token of `uncached` prompts
GOALS = {"e2e_ratio": 3.0, "prefill_frac": 0.60, "decode_frac": 0.50, "kv_waste": 0.05}


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=None, help="prompts (default 64; quick 8)")
    p.add_argument("--min-len", type=int, default=None, help="shortest prompt (default 128; quick 64)")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt (default 1024; quick 256)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default 128; quick 16)")
    p.add_argument("--batch-size", type=int, default=32, help="transformers static batch (default 32)")
    p.add_argument("--decode-min-batch", type=int, default=32,
                   help="phase rates count only batches/steps with this many requests or more "
                        "(default 32; clamped to the number of prompts)")
    p.add_argument("--quick", action="store_true", help="small workload: 8 prompts, 64-256 tokens, 16 out")
    p.add_argument("--loong-only", action="store_true")
    p.add_argument("--hf-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="Loong (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="Loong (default 2048)")
    p.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="Loong KV pool (default: the whole workload's prompt+output, in blocks, +1%%)")
    p.add_argument("--block-size", type=int, default=16, help="Loong KV block size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--synthetic", action="store_true", help="synthetic ids even if L-Eval is present")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"result file (default {os.path.relpath(DEFAULT_JSON, REPO)})")
    p.add_argument("--_worker", choices=("loong", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        return a
    quick = {"num_prompts": 8, "min_len": 64, "max_len": 256, "output_len": 16}
    full = {"num_prompts": 64, "min_len": 128, "max_len": 1024, "output_len": 128}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.loong_only and a.hf_only:
        p.error("--loong-only and --hf-only exclude each other")
    if not 1 <= a.min_len <= a.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    for k in ("num_prompts", "output_len", "batch_size", "decode_min_batch", "max_num_seqs",
              "max_num_batched_tokens", "block_size"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.output_len < 2:
        p.error("--output-len must be >= 2 (decode needs a second token)")
    return a


# ----------------------------------------------------------------------------------------
# Model description and FLOP counting
# ----------------------------------------------------------------------------------------
def read_model_info() -> tuple[dict, object]:
    """(shape dict, Loong tokenizer) of the default model from GGUF metadata (no weights read)."""
    from loong.model.default_model import default_model_path
    path = default_model_path()
    try:
        import gguf
        from loong.model.gguf_loader import config_from_metadata, read_metadata
        from loong.model.tokenizer import Tokenizer
        reader = gguf.GGUFReader(path)
        meta = read_metadata(reader)
        cfg = config_from_metadata(meta, {t.name for t in reader.tensors}, None)
        tok = Tokenizer.from_gguf_metadata(meta)
    except Exception:  # loader internals moved: pay for a full load instead
        from loong.model.loader import load_model_files
        loaded = load_model_files(None)
        cfg, tok = loaded.config, loaded.tokenizer
    info = {"path": path, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "tie_word_embeddings": cfg.tie_word_embeddings}
    return info, tok


class FlopModel:
    """FLOPs of a Llama-family forward: 2 * linear params per token, the LM head per row it is
    computed for, and attention 4 * H * D * layers per (query token, key) pair (QK^T + PV).

    `ctx` arguments are sums over computed tokens of the keys each one attends to, so causal
    prefill of p tokens counts p(p+1)/2 pairs (the "halved" quadratic term, exactly).
    """

    def __init__(self, m: dict) -> None:
        h, d, inter, L = m["hidden_size"], m["head_dim"], m["intermediate_size"], m["num_layers"]
        q, kv = m["num_heads"] * d, m["num_kv_heads"] * d
        self.linear_params = L * (h * (q + 2 * kv) + q * h + 3 * h * inter)
        self.head_params = m["vocab_size"] * h
        self.attn_per_pair = 4 * m["num_heads"] * d * L

    def flops(self, tokens: float, head_rows: float, ctx_pairs: float) -> float:
        return 2.0 * self.linear_params * tokens + 2.0 * self.head_params * head_rows \
            + float(self.attn_per_pair) * ctx_pairs

    # The minimum the workload needs, the same for every system ("useful" FLOPs).
    def useful_prefill(self, lens: list[int]) -> float:
        return sum(self.flops(p, 1, p * (p + 1) / 2) for p in lens)

    def useful_decode(self, lens: list[int], out_len: int) -> float:
        # Output token j (j = 2..O) comes from a forward of the token at position p+j-2,
        # which attends to p+j-1 keys.
        n = out_len - 1
        return sum(self.flops(n, n, n * p + n * (n + 1) / 2) for p in lens)


def causal_pairs(start: int, n: int) -> int:
    """Keys attended by tokens [start, start+n) of one sequence, causally."""
    return n * start + n * (n + 1) // 2


# ----------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------
def build_workload(a: argparse.Namespace, tok, vocab_size: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(a.seed)
    lens = [int(x) for x in rng.integers(a.min_len, a.max_len + 1, size=a.num_prompts)]
    files = sorted(glob.glob(os.path.join(LEVAL_DIR, "*.jsonl")))
    prompts: list[list[int]] = []
    if files and not a.synthetic:
        docs: list[str] = []
        for f in files:
            with open(f) as fh:
                docs.extend(json.loads(line)["input"] for line in fh if line.strip())
        picked = []
        for L in lens:
            for _ in range(100):
                i = int(rng.integers(len(docs)))
                text = docs[i]
                span = 10 * L + 64  # characters: comfortably more than L tokens of prose
                off = int(rng.integers(0, max(1, len(text) - span)))
                ids = tok.encode(text[off:off + span], add_special_tokens=False)[1:]  # drop a cut word
                if len(ids) >= L:
                    prompts.append(ids[:L])
                    picked.append(i)
                    break
            else:
                raise RuntimeError(f"no L-Eval document gave {L} tokens")
        source = f"L-Eval token windows ({len(files)} files, {len(docs)} documents, {len(set(picked))} used)"
    else:
        g = rng.integers(100, vocab_size - 100, size=sum(lens))
        pos = 0
        for L in lens:
            prompts.append([int(x) for x in g[pos:pos + L]])
            pos += L
        source = "synthetic token ids (uniform, seeded)"
    return {"prompts": prompts, "lens": lens, "source": source, "seed": a.seed,
            "output_len": a.output_len}


# ----------------------------------------------------------------------------------------
# Loong worker (subprocess)
# ----------------------------------------------------------------------------------------
def uncached(prompts: list[list[int]]) -> list[list[int]]:
    """The prompts with their first token changed (lengths unchanged): a pass over them
    shares no KV block with an earlier pass over the originals, so an engine with prefix
    caching cannot skip the prefill being measured."""
    return [[FRESH_TOKEN if p[0] != FRESH_TOKEN else FRESH_TOKEN + 1] + list(p[1:])
            for p in prompts]


def _drive(engine, prompts: list[list[int]], params, flop: FlopModel) -> dict:
    """Queue all prompts, step the engine to completion, time and classify every step
    (the engine keeps each step's plan in `last_plan`)."""
    t0 = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    outputs = {}
    steps = []
    worker = engine.executor.worker               # the in-process instance
    bs = worker.pool.block_size
    while engine.has_unfinished():
        before = engine.stats["steps"]
        ts = time.perf_counter()
        updated = engine.step()
        dt = time.perf_counter() - ts
        if engine.stats["steps"] == before:
            raise RuntimeError("the policy planned nothing with requests unfinished")
        plan = engine.last_plan
        chunks = [it for g in plan.batches for it in g.items]
        nd = sum(1 for c in chunks if c.is_decode)
        tokens = sum(len(c.token_ids) for c in chunks)
        head_rows = sum(1 for c in chunks if c.sample)
        pairs = sum(causal_pairs(c.start, len(c.token_ids)) for c in chunks)
        kind = "decode" if nd == len(chunks) else ("prefill" if nd == 0 else "mixed")
        for o in updated:
            if o.finished:
                outputs[o.request_id] = o
        held = sum(worker.shards.summary().values())
        steps.append({"dt": dt, "kind": kind, "n_decode": nd, "n_chunks": len(chunks),
                      "tokens": tokens, "flops": flop.flops(tokens, head_rows, pairs),
                      "blocks_used": worker.pool.num_used, "tokens_held": held,
                      "preempted": len(plan.preempted)})
    wall = time.perf_counter() - t0
    outs = [outputs[r] for r in rids]
    return {"wall": wall, "steps": steps, "outputs": outs, "block_size": bs}


def loong_worker(spec: dict) -> dict:
    rss = bc.RssSampler().start()
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from loong import LLM, SamplingParams
    from loong.kv.cache_pool import kv_bytes_per_token
    from loong.model.loader import load_model_files
    res: dict = {"rss_after_import": bc.rss_bytes()}
    flop = FlopModel(spec["model"])
    prompts, out_len = spec["prompts"], spec["output_len"]
    with rss.phase("load"):
        t = time.perf_counter()
        llm = LLM(loaded=load_model_files(None), dtype="bfloat16", device="cpu",
                  max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
                  kv_capacity_tokens=spec["kv_capacity_tokens"], block_size=spec["block_size"])
        res["load_s"] = time.perf_counter() - t
    res["rss_after_load"] = bc.rss_bytes()
    engine = llm.engine
    with rss.phase("warmup"):
        _drive(engine, uncached([prompts[0][:32]]),
               SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), flop)
    for k in engine.stats:  # count the measured runs only
        engine.stats[k] = 0
    preempt0 = engine.policy.stats["preemptions"]

    with rss.phase("main"):
        main = _drive(engine, prompts, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True),
                      flop)
    stats_main = dict(engine.stats)
    with rss.phase("prefill_pass"):
        # The main run's prompts again, each with another first token: their KV from the
        # main run must not be reused (prefix caching), this pass measures prefill.
        pre = _drive(engine, uncached(prompts),
                     SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), flop)
    rss.stop()

    bs = main["block_size"]
    steps = main["steps"]
    kvb = kv_bytes_per_token(engine.model_config, engine.dtype)
    peak_held = max((st["tokens_held"] for st in steps), default=0)
    min_batch = spec["decode_min_batch"]
    dec = [s for s in steps if s["kind"] == "decode" and s["n_decode"] >= min_batch]
    dec_time = sum(s["dt"] for s in dec)
    dec_tokens = sum(s["n_decode"] for s in dec)
    out_tokens = sum(len(o.token_ids) for o in main["outputs"])
    prompt_tokens = sum(len(p) for p in prompts)
    kinds = {}
    for s in steps:
        k = kinds.setdefault(s["kind"], {"steps": 0, "time_s": 0.0, "tokens": 0})
        k["steps"] += 1
        k["time_s"] += s["dt"]
        k["tokens"] += s["tokens"]
    sum_held = sum(s["tokens_held"] for s in steps)
    sum_cap = sum(s["blocks_used"] * bs for s in steps)
    tw_held = sum(s["tokens_held"] * s["dt"] for s in steps)
    tw_cap = sum(s["blocks_used"] * bs * s["dt"] for s in steps)
    peak_step = max(steps, key=lambda s: s["blocks_used"])
    ttfts = [o.ttft for o in main["outputs"] if o.ttft is not None]
    tpots = [o.tpot for o in main["outputs"] if o.tpot is not None]
    res.update({
        "e2e": {"wall_s": main["wall"], "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
                "output_tok_s": out_tokens / main["wall"],
                "executed_flops": sum(s["flops"] for s in steps),
                "steps_by_kind": kinds,
                "ttft_mean_s": statistics.mean(ttfts) if ttfts else None,
                "tpot_mean_s": statistics.mean(tpots) if tpots else None,
                "all_full_length": all(len(o.token_ids) == out_len for o in main["outputs"])},
        "prefill": {"wall_s": pre["wall"], "prompt_tokens": prompt_tokens,
                    "tok_s": prompt_tokens / pre["wall"],
                    "executed_flops": sum(s["flops"] for s in pre["steps"]),
                    "steps": len(pre["steps"]),
                    "step_kinds": sorted({s["kind"] for s in pre["steps"]}),
                    "tokens_per_step_mean": prompt_tokens / max(1, len(pre["steps"]))},
        "decode": {"min_batch": min_batch, "steps": len(dec), "time_s": dec_time, "tokens": dec_tokens,
                   "tok_s": dec_tokens / dec_time if dec_time else None,
                   "batch_mean": dec_tokens / len(dec) if dec else None,
                   "executed_flops": sum(s["flops"] for s in dec),
                   "step_ms_median": 1e3 * statistics.median([s["dt"] for s in dec]) if dec else None},
        "kv": {"bytes_per_token": kvb, "block_size": bs, "num_blocks": engine.executor.blocks_per_instance,
               "pool_bytes": engine.executor.worker.cache.nbytes,
               "peak_blocks_used": stats_main["max_blocks_used"],
               "peak_bytes_in_blocks": stats_main["max_blocks_used"] * bs * kvb,
               "peak_tokens_held": peak_held,
               "peak_bytes_holding_tokens": peak_held * kvb,
               "waste_at_peak": 1 - peak_held / max(1, stats_main["max_blocks_used"] * bs),
               "waste_at_peak_step": 1 - peak_step["tokens_held"] / max(1, peak_step["blocks_used"] * bs),
               "waste_step_avg": 1 - sum_held / sum_cap if sum_cap else None,
               "waste_time_avg": 1 - tw_held / tw_cap if tw_cap else None,
               "pool_use_at_peak": stats_main["max_blocks_used"] / engine.executor.blocks_per_instance,
               "preemptions": engine.policy.stats["preemptions"] - preempt0},
        "rss": {"peak_lifetime_bytes": bc.maxrss_bytes(), "peak_by_phase_bytes": rss.peaks},
        "engine_stats_main": stats_main,
        "token_ids": [list(o.token_ids) for o in main["outputs"]],
        "step_trace": [[round(s["dt"] * 1e3, 3), s["kind"], s["n_chunks"], s["tokens"],
                        s["blocks_used"], s["tokens_held"]] for s in steps],
        "step_trace_fields": ["ms", "kind", "chunks", "tokens", "blocks_used", "tokens_held"],
    })
    return res


# ----------------------------------------------------------------------------------------
# transformers worker (subprocess)
# ----------------------------------------------------------------------------------------
def hf_worker(spec: dict) -> dict:
    rss = bc.RssSampler().start()
    import collections

    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import transformers
    from transformers import AutoModelForCausalLM, GgufConfig
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    res: dict = {"rss_after_import": bc.rss_bytes(), "transformers": transformers.__version__}
    flop = FlopModel(spec["model"])
    path = spec["model"]["path"]
    with rss.phase("load"):
        t = time.perf_counter()
        # Dense bf16 weights (dequantized at load), like Loong: not the packed-GGUF kernels.
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        model.eval()
        res["load_s"] = time.perf_counter() - t
    res["rss_after_load"] = bc.rss_bytes()
    res["attn_implementation"] = model.config._attn_implementation
    res["module_types"] = dict(collections.Counter(type(m).__name__ for m in model.modules()
                                                   if not list(m.children())))
    res["linear_dtypes"] = sorted({str(m.weight.dtype) for m in model.modules()
                                   if isinstance(m, torch.nn.Linear)})
    model.generation_config.eos_token_id = None  # ignore EOS: always generate max_new_tokens
    pad = 0
    prompts, out_len, B = spec["prompts"], spec["output_len"], spec["batch_size"]
    batches = [prompts[i:i + B] for i in range(0, len(prompts), B)]

    def tensors(batch):
        lmax = max(len(p) for p in batch)
        ids = torch.full((len(batch), lmax), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), lmax), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, lmax - len(p):] = torch.tensor(p)
            mask[r, lmax - len(p):] = 1
        return ids, mask

    def gen(batch, n):
        ids, mask = tensors(batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    with rss.phase("warmup"):
        gen([prompts[0][:32]], 4)
    with rss.phase("main"):
        gen_times, token_ids = [], []
        t0 = time.perf_counter()
        for batch in batches:
            t = time.perf_counter()
            new = gen(batch, out_len)
            gen_times.append(time.perf_counter() - t)
            token_ids.extend(new.tolist())
        wall = time.perf_counter() - t0
    with rss.phase("prefill_pass"):
        pre_times = []
        for batch in batches:
            t = time.perf_counter()
            gen(batch, 1)
            pre_times.append(time.perf_counter() - t)
    rss.stop()

    kvb = spec["kv_bytes_per_token"]
    min_batch = spec["decode_min_batch"]
    per_batch = []
    for batch, tg, tp in zip(batches, gen_times, pre_times):
        b, lmax = len(batch), max(len(p) for p in batch)
        lens = [len(p) for p in batch]
        n = out_len - 1
        # Executed: every padded position goes through the linears; generate keeps logits
        # for the last position only (logits_to_keep=1); attention over the padded length.
        pre_exec = flop.flops(b * lmax, b, b * lmax * (lmax + 1) / 2)
        dec_exec = flop.flops(b * n, b * n, b * (n * lmax + n * (n + 1) / 2))
        alloc = b * (lmax + n) * kvb  # DynamicCache after the last step (KV of lmax + n positions)
        held = sum(p + n for p in lens) * kvb
        per_batch.append({"batch": b, "max_len": lmax, "prompt_tokens": sum(lens),
                          "padded_tokens": b * lmax, "gen_s": tg, "prefill_s": tp,
                          "decode_s": tg - tp, "decode_tokens": b * n,
                          "prefill_exec_flops": pre_exec, "decode_exec_flops": dec_exec,
                          "prefill_useful_flops": flop.useful_prefill(lens),
                          "decode_useful_flops": flop.useful_decode(lens, out_len),
                          "kv_alloc_bytes": alloc, "kv_held_bytes": held})
    big = [x for x in per_batch if x["batch"] >= min_batch]
    agg = lambda k, rows: sum(x[k] for x in rows)  # noqa: E731
    out_tokens = sum(len(t) for t in token_ids)
    res.update({
        "e2e": {"wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
                "executed_flops": agg("prefill_exec_flops", per_batch) + agg("decode_exec_flops", per_batch),
                "padding_fraction": 1 - agg("prompt_tokens", per_batch) / agg("padded_tokens", per_batch),
                "all_full_length": all(len(t) == out_len for t in token_ids)},
        "prefill": {"min_batch": min_batch, "batches": len(big), "time_s": agg("prefill_s", big),
                    "prompt_tokens": agg("prompt_tokens", big), "padded_tokens": agg("padded_tokens", big),
                    "tok_s": agg("prompt_tokens", big) / agg("prefill_s", big) if big else None,
                    "executed_flops": agg("prefill_exec_flops", big),
                    "useful_flops": agg("prefill_useful_flops", big)},
        "decode": {"min_batch": min_batch, "batches": len(big), "time_s": agg("decode_s", big),
                   "tokens": agg("decode_tokens", big),
                   "tok_s": agg("decode_tokens", big) / agg("decode_s", big) if big else None,
                   "executed_flops": agg("decode_exec_flops", big),
                   "useful_flops": agg("decode_useful_flops", big)},
        "kv": {"bytes_per_token": kvb, "peak_alloc_bytes": max(x["kv_alloc_bytes"] for x in per_batch),
               "waste_per_batch": [1 - x["kv_held_bytes"] / x["kv_alloc_bytes"] for x in per_batch]},
        "per_batch": per_batch,
        "rss": {"peak_lifetime_bytes": bc.maxrss_bytes(), "peak_by_phase_bytes": rss.peaks},
        "token_ids": token_ids,
    })
    peak = max(per_batch, key=lambda x: x["kv_alloc_bytes"])
    res["kv"]["waste_at_peak"] = 1 - peak["kv_held_bytes"] / peak["kv_alloc_bytes"]
    return res


# ----------------------------------------------------------------------------------------
# Parent: workload, matmul limit, subprocesses, report
# ----------------------------------------------------------------------------------------
def run_child(kind: str, spec_path: str, out_path: str) -> dict | None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_spec", spec_path, "--_out", out_path]
    print(f"[{kind}] running in a subprocess ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not os.path.exists(out_path):
        print(f"[{kind}] FAILED (exit status {rc}); reporting without it", file=sys.stderr, flush=True)
        return None
    print(f"[{kind}] done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    return bc.read_json(out_path)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    def prefix(x, y):
        n = 0
        for u, v in zip(x, y):
            if u != v:
                break
            n += 1
        return n
    pre = [prefix(x, y) for x, y in zip(a, b)]
    return {"first_token_match": sum(1 for n in pre if n >= 1) / len(pre),
            "identical": sum(1 for x, y in zip(a, b) if x == y) / len(pre),
            "mean_common_prefix": statistics.mean(pre)}


def fmt_rate(x):
    return "-" if x is None else f"{x:,.1f}"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_mib(x):
    return "-" if x is None else f"{x / 2**20:,.1f} MiB"


def ratio(a, b):
    return a / b if a is not None and b else None


def mark(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._worker:
        spec = bc.read_json(a._spec)
        res = loong_worker(spec) if a._worker == "loong" else hf_worker(spec)
        bc.write_json(a._out, res)
        return 0

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    model_info, tok = read_model_info()
    flop = FlopModel(model_info)
    wl = build_workload(a, tok, model_info["vocab_size"])
    lens, O = wl["lens"], a.output_len
    N = len(lens)
    bs = a.block_size
    kvb = model_info["num_layers"] * 2 * model_info["num_kv_heads"] * model_info["head_dim"] * 2  # bf16
    blocks = sum(-(-(p + O) // bs) for p in lens)
    kv_tokens = a.kv_capacity_tokens or (blocks + math.ceil(0.011 * blocks) + 1) * bs
    min_batch = min(a.decode_min_batch, N)
    hf_batch = min(a.batch_size, N)
    print(f"workload: {N} prompts, {min(lens)}-{max(lens)} tokens (mean {statistics.mean(lens):.0f}, "
          f"total {sum(lens)}), {O} output tokens each, greedy, ignore_eos; {wl['source']}; "
          f"seed {a.seed}; {threads} torch threads", file=sys.stderr, flush=True)

    print("measuring bf16 matmul limit ...", file=sys.stderr, flush=True)
    mm_before = bc.matmul_limit()
    spec = {"prompts": wl["prompts"], "output_len": O, "threads": threads, "model": model_info,
            "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
            "kv_capacity_tokens": kv_tokens, "block_size": bs, "decode_min_batch": min_batch,
            "batch_size": hf_batch, "kv_bytes_per_token": kvb}
    loong = hf = None
    with tempfile.TemporaryDirectory(prefix="loong_bench_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        bc.write_json(spec_path, spec)
        if not a.hf_only:
            loong = run_child("loong", spec_path, os.path.join(tmp, "loong.json"))
        if not a.loong_only:
            hf = run_child("hf", spec_path, os.path.join(tmp, "hf.json"))
    mm_after = bc.matmul_limit()
    limit = max(mm_before["median_gflops"], mm_after["median_gflops"]) * 1e9

    # Useful FLOPs: what the workload needs, whoever runs it (no padding, LM head for the
    # sampled position only, causal attention over real tokens).
    useful_pre_all = flop.useful_prefill(lens)
    useful_dec_all = flop.useful_decode(lens, O)
    rows = {}
    if loong:
        e, p, d = loong["e2e"], loong["prefill"], loong["decode"]
        # Decode-only steps: useful == executed (no padding; the LM head only for sampled rows).
        rows["loong"] = {
            "e2e_tok_s": e["output_tok_s"], "prefill_tok_s": p["tok_s"], "decode_tok_s": d["tok_s"],
            "e2e_frac_exec": e["executed_flops"] / e["wall_s"] / limit,
            "e2e_frac_useful": (useful_pre_all + useful_dec_all) / e["wall_s"] / limit,
            "prefill_frac_exec": p["executed_flops"] / p["wall_s"] / limit,
            "prefill_frac_useful": useful_pre_all / p["wall_s"] / limit,
            "decode_frac_exec": d["executed_flops"] / d["time_s"] / limit if d["time_s"] else None,
            "decode_frac_useful": d["executed_flops"] / d["time_s"] / limit if d["time_s"] else None,
            "kv_alloc": loong["kv"]["pool_bytes"], "kv_peak_used": loong["kv"]["peak_bytes_in_blocks"],
            "kv_peak_held": loong["kv"]["peak_bytes_holding_tokens"],
            "kv_waste_peak": loong["kv"]["waste_at_peak"], "kv_waste_avg": loong["kv"]["waste_step_avg"],
            "rss_peak": loong["rss"]["peak_lifetime_bytes"],
            "rss_serving": max(loong["rss"]["peak_by_phase_bytes"].get(k, 0) for k in ("main", "prefill_pass")),
            "rss_after_load": loong["rss_after_load"],
        }
    if hf:
        e, p, d = hf["e2e"], hf["prefill"], hf["decode"]
        pb = hf["per_batch"]
        rows["hf"] = {
            "e2e_tok_s": e["output_tok_s"], "prefill_tok_s": p["tok_s"], "decode_tok_s": d["tok_s"],
            "e2e_frac_exec": e["executed_flops"] / e["wall_s"] / limit,
            "e2e_frac_useful": (useful_pre_all + useful_dec_all) / e["wall_s"] / limit,
            "prefill_frac_exec": p["executed_flops"] / p["time_s"] / limit if p["time_s"] else None,
            "prefill_frac_useful": p["useful_flops"] / p["time_s"] / limit if p["time_s"] else None,
            "decode_frac_exec": d["executed_flops"] / d["time_s"] / limit if d["time_s"] else None,
            "decode_frac_useful": d["useful_flops"] / d["time_s"] / limit if d["time_s"] else None,
            "kv_alloc": hf["kv"]["peak_alloc_bytes"], "kv_peak_used": hf["kv"]["peak_alloc_bytes"],
            "kv_peak_held": max(x["kv_held_bytes"] for x in pb),
            "kv_waste_peak": hf["kv"]["waste_at_peak"],
            "kv_waste_avg": 1 - sum(x["kv_held_bytes"] for x in pb) / sum(x["kv_alloc_bytes"] for x in pb),
            "rss_peak": hf["rss"]["peak_lifetime_bytes"],
            "rss_serving": max(hf["rss"]["peak_by_phase_bytes"].get(k, 0) for k in ("main", "prefill_pass")),
            "rss_after_load": hf["rss_after_load"],
        }
    L, H = rows.get("loong", {}), rows.get("hf", {})
    ratios = {k: ratio(L.get(k), H.get(k)) for k in ("e2e_tok_s", "prefill_tok_s", "decode_tok_s")}
    goals = {
        "e2e_ratio>=3": None if ratios["e2e_tok_s"] is None else ratios["e2e_tok_s"] >= GOALS["e2e_ratio"],
        "prefill>=60%_of_limit": None if not L else L["prefill_frac_useful"] >= GOALS["prefill_frac"],
        "decode>=50%_of_limit": None if not L or L["decode_frac_useful"] is None
        else L["decode_frac_useful"] >= GOALS["decode_frac"],
        "kv_waste<5%": None if not L else L["kv_waste_peak"] < GOALS["kv_waste"],
    }
    agree = agreement(loong["token_ids"], hf["token_ids"]) if loong and hf else None

    # ----- table ------------------------------------------------------------------------
    def line(name, key, f, goal=""):
        lv, hv = L.get(key), H.get(key)
        r = ratio(lv, hv) if key in ratios or key.endswith("tok_s") else None
        rs = "-" if r is None else f"{r:.2f}x"
        print(f"{name:<44}{f(lv) if L else '-':>16}{f(hv) if H else '-':>16}{rs:>10}  {goal}")

    lim = limit / 1e9
    print()
    print(f"Offline throughput: {N} prompts {min(lens)}-{max(lens)} tok (total {sum(lens)}), {O} out, "
          f"bf16, {threads} threads; {wl['source']}")
    print(f"bf16 matmul limit (2048^3, median of {mm_before['reps']}): before {mm_before['median_gflops']:.1f}, "
          f"after {mm_after['median_gflops']:.1f} GFLOP/s; using {lim:.1f}")
    print(f"phase rates count batches/steps of >= {min_batch} requests; transformers batch {hf_batch}; "
          f"Loong max_num_seqs {a.max_num_seqs}, max_num_batched_tokens {a.max_num_batched_tokens}, "
          f"KV capacity {kv_tokens} tokens")
    print()
    print(f"{'':<44}{'Loong':>16}{'transformers':>16}{'ratio':>10}  goal")
    print("-" * 100)
    line("end-to-end output tok/s", "e2e_tok_s", fmt_rate,
         f">= {GOALS['e2e_ratio']:.0f}x  {mark(goals['e2e_ratio>=3'])}")
    line("prefill prompt tok/s", "prefill_tok_s", fmt_rate)
    line(f"decode tok/s (batch >= {min_batch})", "decode_tok_s", fmt_rate)
    print(f"% of bf16 matmul limit ({lim:.0f} GFLOP/s):")
    line("  prefill, useful FLOPs", "prefill_frac_useful", fmt_pct,
         f">= {GOALS['prefill_frac']:.0%}  {mark(goals['prefill>=60%_of_limit'])}")
    line("  prefill, executed FLOPs", "prefill_frac_exec", fmt_pct)
    line("  decode, useful FLOPs", "decode_frac_useful", fmt_pct,
         f">= {GOALS['decode_frac']:.0%}  {mark(goals['decode>=50%_of_limit'])}")
    line("  decode, executed FLOPs", "decode_frac_exec", fmt_pct)
    line("  end-to-end, useful FLOPs", "e2e_frac_useful", fmt_pct)
    line("  end-to-end, executed FLOPs", "e2e_frac_exec", fmt_pct)
    print("KV cache:")
    line("  allocated (Loong pool / HF peak cache)", "kv_alloc", fmt_mib)
    line("  peak in use (blocks / padded cache)", "kv_peak_used", fmt_mib)
    line("  peak holding tokens", "kv_peak_held", fmt_mib)
    line("  waste at peak", "kv_waste_peak", fmt_pct,
         f"< {GOALS['kv_waste']:.0%}  {mark(goals['kv_waste<5%'])}")
    line("  waste averaged over steps / batches", "kv_waste_avg", fmt_pct)
    print("memory (each system in its own process):")
    line("  RSS after model load", "rss_after_load", fmt_mib)
    line("  peak RSS while serving (sampled)", "rss_serving", fmt_mib)
    line("  peak RSS, process lifetime (getrusage)", "rss_peak", fmt_mib)
    print("-" * 100)
    print("FLOPs: 2*linear params per computed token + LM head per row it is computed for + "
          "4*H*D*layers per (token, key) pair, causal.")
    print("  executed = what each system computes: Loong = the scheduled tokens, LM head on sampled "
          "rows only; transformers = every padded position, LM head on the last position only "
          "(generate passes logits_to_keep=1), attention over the padded length.")
    print("  useful = the minimum for the outputs (no padding, LM head once per output token); "
          "the same count for both systems.")
    if loong:
        k = loong["e2e"]["steps_by_kind"]
        print("Loong main run steps: " + ", ".join(f"{n} {v['steps']} ({v['time_s']:.2f}s)" for n, v in k.items())
              + f"; prefill pass {loong['prefill']['steps']} steps, "
              f"{loong['prefill']['tokens_per_step_mean']:.0f} tok/step; decode steps used "
              f"{loong['decode']['steps']} (mean batch {loong['decode']['batch_mean'] or 0:.1f}, median "
              f"{loong['decode']['step_ms_median'] or 0:.1f} ms); preemptions {loong['kv']['preemptions']}; "
              f"KV pool use at peak {loong['kv']['pool_use_at_peak']:.1%}")
    if hf:
        print(f"transformers: {hf['transformers']}, attention {hf['attn_implementation']}, linear weights "
              f"{hf['linear_dtypes']}; padding {hf['e2e']['padding_fraction']:.1%} of prompt positions; "
              f"batches {[x['batch'] for x in hf['per_batch']]}")
    if agree:
        print(f"output agreement (greedy, bf16): first token {agree['first_token_match']:.0%}, identical "
              f"{agree['identical']:.0%}, mean common prefix {agree['mean_common_prefix']:.1f}/{O}")
    for name, want, got in (("Loong", not a.hf_only, loong), ("transformers", not a.loong_only, hf)):
        if want and got is None:
            print(f"WARNING: the {name} run failed; see its error above")
    if (loong and not loong["e2e"]["all_full_length"]) or (hf and not hf["e2e"]["all_full_length"]):
        print("WARNING: some request did not produce output_len tokens")

    result = {
        "benchmark": "offline_throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
        "machine": bc.machine_info(),
        "model": model_info,
        "flop_model": {"linear_params": flop.linear_params, "head_params": flop.head_params,
                       "attn_flops_per_pair": flop.attn_per_pair,
                       "useful_prefill_flops": useful_pre_all, "useful_decode_flops": useful_dec_all},
        "workload": {"num_prompts": N, "lens": lens, "output_len": O, "source": wl["source"],
                     "seed": a.seed, "prompt_tokens": sum(lens)},
        "settings": {"threads": threads, "phase_min_batch": min_batch, "hf_batch_size": hf_batch,
                     "kv_capacity_tokens": kv_tokens, "block_size": bs,
                     "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens},
        "matmul_limit": {"before": mm_before, "after": mm_after, "used_gflops": lim},
        "summary": {"loong": L or None, "transformers": H or None, "ratios": ratios, "goals": goals,
                    "goal_thresholds": GOALS, "output_agreement": agree},
        "failed": [k for k, want, got in (("loong", not a.hf_only, loong), ("transformers", not a.loong_only, hf))
                   if want and got is None],
        "loong": {k: v for k, v in (loong or {}).items() if k != "token_ids"} or None,
        "transformers": {k: v for k, v in (hf or {}).items() if k != "token_ids"} or None,
    }
    bc.write_json(a.json, result)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
