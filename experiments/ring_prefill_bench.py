"""Striped ring prefill on 1 vs 2 CPU instances (one thread each): speedup, bytes, hidden comm.

For each prompt length (default 1K, 2K, 4K, 8K tokens) one prompt of exactly that many
tokens (a window of the longest L-Eval document under `../shared/data/leval`, field `input`,
tokenized with the model's tokenizer; deterministic synthetic ids when that folder is missing
or with --synthetic) is prefilled by two `LLMEngine`s kept alive side by side: a ring of
one instance (the baseline: the instance runs in this process, `LocalExecutor`, the same
worker and ring code with no communication) and a ring of two (two instance processes,
`ClusterExecutor`). Both run the `simple` policy (every prefill over all instances) with
`overlap_groups=False` (lockstep: each engine step runs one plan to its end through
`executor.execute`, so the prefill is one timed call). Every prefill's first token is
replaced by one of its own (`fresh`), so none can reuse KV cached by an earlier one. Each
request asks for one token (greedy, EOS ignored), so the request's first step is the whole
prefill. Per length and engine: one warm-up prefill, then --runs timed ones, the two
engines alternating run by run so that drift on the machine hits both alike.

Measured per length:
- prefill time: wall time of the engine's prefill step (the `executor.execute` call that
  runs the prefill plan, wrapped from outside; engine code is not changed), median of the
  runs. speedup = t(1 instance) / t(2 instances). The JSON also has the whole
  `engine.step()` wall time (adds detokenizing and the release round trip).
- bytes: sum over instances of the step's `InstanceCounters.bytes_sent`, against the ring's
  minimum: every position's KV chunk visits every other member once, so each instance sends
  (n-1)/n * L * kv_bytes_per_token and the cluster (n-1) * L * kv_bytes_per_token.
- exposed communication: the min over instances of the step's `comm_wait_s` (time blocked in
  the data plane's waits). Waits of the faster instance include waiting for the slower one
  to finish its layer (load imbalance, not communication); the slowest instance never waits
  for a peer's compute, so what it waits for is communication left unhidden. The max (all
  waiting, imbalance included) is printed too, as a share of the step time.
- transfer time: the same ring exchanges without compute, measured in this run by a
  2-process gloo micro-benchmark (spawned, one thread each, 127.0.0.1): num_layers exchanges
  of the step's per-layer chunk sizes, isend/irecv both ways, median of several runs.
  hidden share = max(0, 1 - exposed / transfer time).
- share of the bf16 matmul limit: useful prefill FLOPs (offline_throughput.FlopModel: 2 x
  linear params per token, the LM head once, causal attention pairs L(L+1)/2) / time, against
  n x the one-thread 2048^3 bf16 matmul limit (bench_common.matmul_limit, median of 9, before
  and after, the larger), since n instances run one thread each.

Usage: python experiments/ring_prefill_bench.py [--lengths 1024,2048,4096,8192] [--runs 3]
           [--quick] [--comm-reps 7] [--synthetic] [--no-matmul]
           [--json experiments/results/ring_prefill_bench.json]
--quick: lengths 256,512, 1 run, 3 transfer runs (a smoke test: the full run's code path,
numbers not meaningful). Run the full benchmark on an otherwise idle machine with at least
2 cores.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402

LEVAL_DIR = os.path.join(REPO, "..", "shared", "data", "leval")
DEFAULT_JSON = os.path.join(HERE, "results", "ring_prefill_bench.json")
INSTANCES = (1, 2)
FIRST_TOKEN = 1000       # prefill k starts with token id FIRST_TOKEN + k (see `fresh`)


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=None,
                   help="prompt lengths in tokens, comma-separated (default 1024,2048,4096,8192; "
                        "quick 256,512)")
    p.add_argument("--runs", type=int, default=None, help="timed prefills per length and engine "
                   "after one warm-up (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: lengths 256,512, 1 run")
    p.add_argument("--comm-reps", type=int, default=None,
                   help="timed runs of the gloo transfer micro-benchmark per length (default 7; quick 3)")
    p.add_argument("--synthetic", action="store_true", help="synthetic ids even if L-Eval is present")
    p.add_argument("--no-matmul", action="store_true", help="skip the bf16 matmul limit")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    p.add_argument("--json", default=DEFAULT_JSON,
                   help=f"result file (default {os.path.relpath(DEFAULT_JSON, REPO)})")
    a = p.parse_args(argv)
    if a.lengths is None:
        a.lengths = "256,512" if a.quick else "1024,2048,4096,8192"
    try:
        a.lengths = [int(x) for x in str(a.lengths).split(",") if x.strip()]
    except ValueError:
        p.error("--lengths must be comma-separated integers")
    if not a.lengths or min(a.lengths) < 2:
        p.error("--lengths needs at least one length >= 2")
    if a.runs is None:
        a.runs = 1 if a.quick else 3
    if a.comm_reps is None:
        a.comm_reps = 3 if a.quick else 7
    if a.runs < 1 or a.comm_reps < 1 or a.block_size < 1:
        p.error("--runs, --comm-reps and --block-size must be >= 1")
    return a


# ----------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------
def build_prompts(lengths: list[int], tok, vocab_size: int, synthetic: bool) -> tuple[dict, str]:
    """{L: token ids} of exactly L tokens each; every prompt is a prefix of the longest one."""
    top = max(lengths)
    files = sorted(glob.glob(os.path.join(LEVAL_DIR, "*.jsonl")))
    if files and not synthetic:
        docs: list[tuple[str, str]] = []
        for f in files:
            with open(f) as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        docs.append((f"{os.path.basename(f)}:{i}", json.loads(line)["input"]))
        # Longest documents first (ties by name); concatenate until there are enough tokens.
        docs.sort(key=lambda d: (-len(d[1]), d[0]))
        ids: list[int] = []
        used = []
        for name, text in docs:
            ids.extend(tok.encode(text[:12 * top + 4096], add_special_tokens=False))
            used.append(name)
            if len(ids) >= top:
                break
        if len(ids) < top:
            raise RuntimeError(f"the L-Eval documents give only {len(ids)} tokens, need {top}")
        source = f"L-Eval text ({', '.join(used)}), from the document's start"
    else:
        import numpy as np
        rng = np.random.default_rng(0)
        ids = [int(x) for x in rng.integers(100, vocab_size - 100, size=top)]
        source = "synthetic token ids (uniform, seed 0)"
    return {L: ids[:L] for L in lengths}, source


# ----------------------------------------------------------------------------------------
# Gloo transfer micro-benchmark (2 spawned processes, one thread each)
# ----------------------------------------------------------------------------------------
def _comm_worker(rank: int, init: str, spec: dict, out_dir: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        peer = 1 - rank
        hkv, d, layers = spec["num_kv_heads"], spec["head_dim"], spec["num_layers"]
        res = {}
        for L, (c0, c1) in spec["chunks"].items():
            mine, theirs = (c0, c1) if rank == 0 else (c1, c0)
            send = [torch.randn(2, mine, hkv, d).to(torch.bfloat16) for _ in range(layers)]
            recv = [torch.empty(2, theirs, hkv, d, dtype=torch.bfloat16) for _ in range(layers)]

            def once() -> float:
                dist.barrier()
                t0 = time.perf_counter()
                for layer in range(layers):    # one exchange per layer, as the ring does
                    ops = []
                    if mine:
                        ops.append(dist.isend(send[layer], dst=peer, tag=1))
                    if theirs:
                        ops.append(dist.irecv(recv[layer], src=peer, tag=1))
                    for w in ops:
                        w.wait()
                return time.perf_counter() - t0

            once()                                 # warm-up (connections, buffers)
            res[L] = [once() for _ in range(spec["reps"])]
        with open(os.path.join(out_dir, f"comm{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transfer_times(chunks: dict[int, tuple[int, int]], model: dict, reps: int) -> dict:
    """{L: {median_s, runs_s}}: the ring's exchanges for a 2-ring alone, no compute.

    A run's time is the slower rank's (barrier, then num_layers isend/irecv exchanges)."""
    import torch.multiprocessing as tmp
    spec = {"chunks": {str(L): c for L, c in chunks.items()}, "reps": reps,
            "num_layers": model["num_layers"], "num_kv_heads": model["num_kv_heads"],
            "head_dim": model["head_dim"]}
    with tempfile.TemporaryDirectory(prefix="loong_ringbench_") as tmpdir:
        init = f"tcp://127.0.0.1:{_free_port()}"
        # daemon: the children die with this process; spawn kills the other if one fails.
        tmp.spawn(_comm_worker, args=(init, spec, tmpdir), nprocs=2, join=True, daemon=True)
        per_rank = [bc.read_json(os.path.join(tmpdir, f"comm{r}.json")) for r in range(2)]
    out = {}
    for L in chunks:
        runs = [max(a, b) for a, b in zip(per_rank[0][str(L)], per_rank[1][str(L)])]
        out[L] = {"median_s": statistics.median(runs), "runs_s": runs}
    return out


# ----------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------
class Timed:
    """Wraps an engine's executor.execute: remembers (plan, seconds, result) of each call."""

    def __init__(self, engine) -> None:
        self.calls: list[tuple[object, float, object]] = []
        ex = engine.executor
        orig = ex.execute

        def execute(plan, requests):
            t0 = time.perf_counter()
            res = orig(plan, requests)
            self.calls.append((plan, time.perf_counter() - t0, res))
            return res
        ex.execute = execute


def fresh(ids: list[int], k: int) -> list[int]:
    """The prompt with its first token replaced by the k-th of a fixed run of ordinary
    token ids: every prefill of the benchmark has a first KV block of its own, so none can
    reuse KV an earlier prefill left cached (prefix caching); both engines get the same
    variant for the same run, so their sampled tokens stay comparable."""
    return [FIRST_TOKEN + k] + list(ids[1:])


def prefill_once(engine, timed: Timed, ids: list[int], params) -> dict:
    """Prefill one prompt (max_tokens=1) to completion; the prefill step's numbers."""
    timed.calls.clear()
    t0 = time.perf_counter()
    rid = engine.add_request(ids, params)
    token = None
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid and o.finished and o.token_ids:
                token = o.token_ids[-1]
        steps += 1
        if steps > 4:
            raise RuntimeError("a max_tokens=1 request took more than 4 steps")
    wall = time.perf_counter() - t0
    pre = [(p, dt, r) for p, dt, r in timed.calls if p.prefills]
    if len(pre) != 1:
        raise RuntimeError(f"expected one prefill step, saw {len(pre)}")
    plan, dt, res = pre[0]
    (group,) = plan.prefills
    counters = {int(r): vars(c).copy() for r, c in res.counters.items()}
    return {"prefill_s": dt, "request_wall_s": wall, "engine_steps": steps,
            "group": list(group.members), "token": token,
            "keep": [(k.instance, k.begin, k.end) for k in group.items[0].keep],
            "counters": counters,
            "bytes_sent": sum(c["bytes_sent"] for c in counters.values()),
            "bytes_recv": sum(c["bytes_recv"] for c in counters.values()),
            "exposed_comm_s": min(c["comm_wait_s"] for c in counters.values()),
            "max_wait_s": max(c["comm_wait_s"] for c in counters.values()),
            "ring_steps": sum(c["ring_steps"] for c in counters.values())}


def summarize(runs: list[dict]) -> dict:
    med = statistics.median
    ranks = sorted(runs[0]["counters"])
    return {"prefill_s": med(r["prefill_s"] for r in runs),
            "prefill_s_runs": [r["prefill_s"] for r in runs],
            "request_wall_s": med(r["request_wall_s"] for r in runs),
            "bytes_sent": runs[0]["bytes_sent"], "bytes_recv": runs[0]["bytes_recv"],
            "bytes_constant": len({(r["bytes_sent"], r["bytes_recv"]) for r in runs}) == 1,
            "exposed_comm_s": med(r["exposed_comm_s"] for r in runs),
            "exposed_comm_s_runs": [r["exposed_comm_s"] for r in runs],
            "max_wait_s": med(r["max_wait_s"] for r in runs),
            "ring_steps": runs[0]["ring_steps"], "group": runs[0]["group"], "keep": runs[0]["keep"],
            "per_instance": {rk: {k: med(r["counters"][rk][k] for r in runs)
                                  for k in runs[0]["counters"][rk]} for rk in ranks},
            "tokens": [r["token"] for r in runs]}


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def fmt(x, spec, scale=1.0, suffix=""):
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def main(argv=None) -> int:
    a = parse_args(argv)
    # SIGTERM -> SystemExit, so the finally blocks close the instance processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from loong.config import EngineConfig
    from loong.engine.llm_engine import LLMEngine
    from loong.kv.cache_pool import kv_bytes_per_token
    from loong.model.loader import load_model_files
    from loong.sampling_params import SamplingParams
    from offline_throughput import FlopModel

    lengths = sorted(set(a.lengths))
    top = max(lengths)
    t_load = time.perf_counter()
    loaded = load_model_files(None)
    cfg = loaded.config
    model = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers,
             "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "max_position_embeddings": cfg.max_position_embeddings}
    kvb = kv_bytes_per_token(cfg, torch.bfloat16)
    flop = FlopModel(model)
    prompts, source = build_prompts(lengths, loaded.tokenizer, cfg.vocab_size, a.synthetic)
    print(f"model loaded in {time.perf_counter() - t_load:.1f}s; lengths {lengths}, {a.runs} runs "
          f"each; prompts: {source}", file=sys.stderr, flush=True)

    mm_before = mm_after = None
    # One thread: the in-process instance of the 1-instance engine, and the limit of one
    # instance. The 2-instance engine's instances get instance_threads=1.
    torch.set_num_threads(1)
    if not a.no_matmul:
        print("measuring the one-thread bf16 matmul limit ...", file=sys.stderr, flush=True)
        mm_before = bc.matmul_limit()

    bs = a.block_size
    # Per instance; the policy may keep the whole prompt on one instance (fullest first).
    kv_tokens = (-(-(top + 1) // bs) + 1) * bs
    # Prompt + the one sampled token must fit the context; positions computed stay < top.
    max_model_len = max(cfg.max_position_embeddings, top + 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engines: dict[int, object] = {}
    timers: dict[int, Timed] = {}
    executors: dict[int, object] = {}
    raw: dict[int, dict[int, list[dict]]] = {n: {L: [] for L in lengths} for n in INSTANCES}
    warm: dict[int, dict[int, dict]] = {n: {} for n in INSTANCES}
    try:
        for n in INSTANCES:
            t = time.perf_counter()
            print(f"starting a cluster of {n} instance(s), 1 thread each ...", file=sys.stderr, flush=True)
            # simple: every prefill over all n instances (the elastic policy may pick a
            # smaller group); lockstep: one plan per step, run by one executor.execute.
            eng = LLMEngine(EngineConfig(
                model=None, dtype="bfloat16", device="cpu", instances=n, instance_threads=1,
                policy="simple", overlap_groups=False,
                kv_capacity_tokens=kv_tokens, block_size=bs,
                max_num_batched_tokens=max(8192, top), max_num_seqs=8,
                max_model_len=max_model_len), loaded)
            engines[n] = eng
            executors[n] = eng.executor
            timers[n] = Timed(eng)
            print(f"  up in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
        variants = itertools.count()
        for L in lengths:
            ids = fresh(prompts[L], next(variants))
            for n in INSTANCES:                # warm-up
                warm[n][L] = prefill_once(engines[n], timers[n], ids, params)
            for r in range(a.runs):
                ids = fresh(prompts[L], next(variants))
                for n in INSTANCES:            # alternate, so drift hits both
                    raw[n][L].append(prefill_once(engines[n], timers[n], ids, params))
            t1 = statistics.median(x["prefill_s"] for x in raw[1][L])
            t2 = statistics.median(x["prefill_s"] for x in raw[2][L])
            print(f"  L={L}: 1 instance {t1 * 1e3:.1f} ms, 2 instances {t2 * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    finally:
        for n, eng in engines.items():
            try:
                eng.close()
            except Exception as e:   # keep closing the others
                print(f"closing the {n}-instance engine failed: {e}", file=sys.stderr)

    # Transfer time of the same exchanges without compute (engines are down: a quiet CPU).
    # Chunk of group position p: ceil((L - p) / 2) tokens (ring_prefill.stripe_count).
    chunks = {L: ((L + 1) // 2, L // 2) for L in lengths}
    print(f"gloo transfer micro-benchmark ({a.comm_reps} runs per length) ...", file=sys.stderr, flush=True)
    comm = transfer_times(chunks, model, a.comm_reps)
    if mm_before is not None:
        mm_after = bc.matmul_limit()
        limit1 = max(mm_before["median_gflops"], mm_after["median_gflops"]) * 1e9
    else:
        limit1 = None

    rows = []
    for L in lengths:
        s1, s2 = summarize(raw[1][L]), summarize(raw[2][L])
        n = 2
        min_total = (n - 1) * L * kvb                 # every chunk to every other member once
        min_per_inst = (n - 1) / n * L * kvb
        transfer = comm[L]["median_s"]
        useful = flop.useful_prefill([L])
        row = {
            "length": L,
            "t1_s": s1["prefill_s"], "t2_s": s2["prefill_s"],
            "speedup": s1["prefill_s"] / s2["prefill_s"],
            "bytes_sent_total": s2["bytes_sent"],
            "bytes_sent_max_instance": max(v["bytes_sent"] for v in s2["per_instance"].values()),
            "bytes_min_total": min_total, "bytes_min_per_instance": min_per_inst,
            "bytes_over_min": s2["bytes_sent"] / min_total,
            "bytes_sent_1_instance": s1["bytes_sent"],
            "chunk_tokens": list(chunks[L]),
            "chunk_bytes_per_layer": [2 * c * cfg.num_kv_heads * cfg.head_dim * 2 for c in chunks[L]],
            "exposed_comm_s": s2["exposed_comm_s"],
            "transfer_s": transfer,
            "hidden_share": (max(0.0, 1 - s2["exposed_comm_s"] / transfer)
                             if transfer > 0 else None),
            "max_wait_share": s2["max_wait_s"] / s2["prefill_s"],
            "useful_flops": useful,
            "frac_limit_2": useful / s2["prefill_s"] / (2 * limit1) if limit1 else None,
            "frac_limit_1": useful / s1["prefill_s"] / limit1 if limit1 else None,
            "first_token_match": s1["tokens"] == s2["tokens"],
            "one": s1, "two": s2, "transfer": comm[L],
            "warmup": {"one": warm[1][L], "two": warm[2][L]},
        }
        rows.append(row)

    # ----- table ------------------------------------------------------------------------
    print()
    print(f"Striped ring prefill, 1 vs 2 CPU instances (1 thread each), bf16, SmolLM2-135M; "
          f"median of {a.runs} run(s) after 1 warm-up; {source}")
    print(f"KV per token {kvb} B ({cfg.num_layers} layers x 2 x {cfg.num_kv_heads} kv heads x "
          f"{cfg.head_dim} x 2 B); ring minimum, cluster total = (n-1) * L * kv_bytes "
          f"(= n x the per-instance (n-1)/n * L * kv_bytes)")
    if limit1:
        print(f"bf16 matmul limit, 1 thread (2048^3, median of {mm_before['reps']}): before "
              f"{mm_before['median_gflops']:.1f}, after {mm_after['median_gflops']:.1f} GFLOP/s; "
              f"n instances -> n x {limit1 / 1e9:.1f}")
    print()
    hdr = (f"{'L':>6} {'t1 ms':>9} {'t2 ms':>9} {'speedup':>8} {'sent MiB':>9} {'min MiB':>8} "
           f"{'sent/min':>8} {'exposed ms':>10} {'xfer ms':>8} {'hidden':>7} {'maxwait':>7} {'%lim n=2':>9} "
           f"{'%lim n=1':>9} {'tok=':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['length']:>6} {fmt(r['t1_s'], '9.1f', 1e3)} {fmt(r['t2_s'], '9.1f', 1e3)} "
              f"{fmt(r['speedup'], '7.2f', suffix='x')} {fmt(r['bytes_sent_total'], '9.2f', 2**-20)} "
              f"{fmt(r['bytes_min_total'], '8.2f', 2**-20)} {fmt(r['bytes_over_min'], '8.3f')} "
              f"{fmt(r['exposed_comm_s'], '10.2f', 1e3)} {fmt(r['transfer_s'], '8.2f', 1e3)} "
              f"{fmt(r['hidden_share'], '6.1f', 100, '%')} {fmt(r['max_wait_share'], '6.1f', 100, '%')} "
              f"{fmt(r['frac_limit_2'], '8.1f', 100, '%')} "
              f"{fmt(r['frac_limit_1'], '8.1f', 100, '%')} {'yes' if r['first_token_match'] else 'NO':>5}")
    print("-" * len(hdr))
    print("t1/t2: the prefill step (executor.execute of the prefill plan); sent: sum of "
          "bytes_sent over the 2 instances; exposed: min over instances of comm_wait_s (the slowest instance's waits); xfer: the "
          "same exchanges alone (2-process gloo, median); hidden = max(0, 1 - exposed/xfer); maxwait: "
          "the longest waiting instance's waits (imbalance included) over the step time; %lim: useful "
          "prefill FLOPs/s over n x the 1-thread bf16 matmul limit; tok=: same sampled token on "
          "1 and 2 instances (greedy).")
    for r in rows:
        pi = r["two"]["per_instance"]
        print(f"  L={r['length']}: per instance (rank: sent MiB, wait ms, compute ms, ring steps) "
              + "; ".join(f"{k}: {v['bytes_sent'] / 2**20:.2f}, {v['comm_wait_s'] * 1e3:.1f}, "
                          f"{v['compute_s'] * 1e3:.1f}, {v['ring_steps']}" for k, v in pi.items())
              + f"; keep {r['two']['keep']}")
    warns = []
    for r in rows:
        if r["bytes_sent_1_instance"]:
            warns.append(f"L={r['length']}: the 1-instance ring sent {r['bytes_sent_1_instance']} bytes")
        if not r["two"]["bytes_constant"]:
            warns.append(f"L={r['length']}: bytes differ between runs")
        if r["two"]["group"] != [0, 1]:
            warns.append(f"L={r['length']}: the 2-instance prefill ran on group {r['two']['group']}")
    for w in warns:
        print("WARNING: " + w)

    result = {
        "benchmark": "ring_prefill_bench",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(a),
        "machine": bc.machine_info(),
        "model": model,
        "prompt_source": source,
        "settings": {"instances": list(INSTANCES), "instance_threads": 1, "dtype": "bfloat16",
                     "policy": "simple", "overlap_groups": False,
                     "executors": {str(n): type(e).__name__ for n, e in executors.items()},
                     "kv_capacity_tokens_per_instance": kv_tokens, "block_size": bs,
                     "max_model_len": max_model_len, "kv_bytes_per_token": kvb},
        "matmul_limit_1_thread": {"before": mm_before, "after": mm_after,
                                  "used_gflops": limit1 / 1e9 if limit1 else None},
        "rows": rows,
        "raw": {str(n): {str(L): v for L, v in d.items()} for n, d in raw.items()},
        "warnings": warns,
    }
    bc.write_json(a.json, result)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
