"""Decode latency: batch-1 tokens/s, the fixed cost of a decode step, batched decode against
the machine's matmul limit, and the weight-streaming kernel, in one run (issue 18).

Sections (medians of `--runs`; a decode step's time is measured by difference, the same way
for every engine: generating `n` tokens minus generating 1 from the same prompts, over n - 1):
  weights   every projection of the model streamed once per "token" at 1, 4 and 8 rows:
            `loong.ops.linear` (the skinny kernel at 1 row, the packed one from 2) vs
            `F.linear`, GB/s and the share of the read bandwidth measured here.
  batch1    SmolLM2 bf16, one stream, at 64 and 2048 context tokens: 1 instance; 2 instances
            at 64 (the control plane and multi-master decode); then 1 instance with
            weight_dtype="q8_0" (`--weight-dtypes`; accuracy: experiments/q8_accuracy.py).
  fixed     a random 30-layer model with hidden size 64 (arithmetic nearly nil): ms per decode
            step = the step's fixed cost; `--fixed-heads` 2 heads of size 32 by default (the
            smallest head size the SIMD attention kernels take; 4 heads of size 16 would time
            the scalar fallback attention, about 8 us of arithmetic per layer that no real
            model runs); native layer loop vs the eager Python loop
            (LOONG_EAGER_DECODE=1), 1 and 2 instances; on 2, the control plane's share (step
            time minus the busiest instance's compute, from the instances' counters).
  batched   batch 32 and 64 (64-token prompts): the step by difference (as for the peers),
            and a pure decode step (every row decoding, timed per engine step): its GFLOP/s
            (2 x parameters x rows, plus attention) as a share of the bf16 matmul limit
            measured right before it, per run.
  peers     the batch-1 and batched workloads through vLLM's CPU build (`--vllm-python`, its
            own venv; the model exported as a bf16 Hugging Face directory) and llama.cpp
            (`--llamacpp-python`, llama-cpp-python on the embedded Q4_1 GGUF: 4.5-bit weights,
            not bf16), where installed; ratios to Loong.

    python experiments/decode_latency.py --quick     # tiny settings (smoke test)
    python experiments/decode_latency.py             # 3 runs of 64 tokens everywhere

Writes experiments/results/decode_latency.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402
from decode_peers import prompt_ids, step_times  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
DEFAULT_LLAMACPP_PYTHON = "/tmp/llamacpp-venv/bin/python"


def read_bandwidth_gbs(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Median GB/s of summing a large bf16 tensor (a streaming read)."""
    import torch
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


class LoongRunner:
    """`timed(prompts, n)` for an `LLM` (the interface decode_peers.step_times uses)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def timed(self, prompts, n: int) -> float:
        from loong import SamplingParams
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate(prompts, sp)
        return time.perf_counter() - t0


@contextlib.contextmanager
def eager_decode(on: bool):
    """LOONG_EAGER_DECODE=1 for models built inside (read when a model is constructed, also
    by instance processes, which inherit the environment)."""
    old = os.environ.get("LOONG_EAGER_DECODE")
    if on:
        os.environ["LOONG_EAGER_DECODE"] = "1"
    else:
        os.environ.pop("LOONG_EAGER_DECODE", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOONG_EAGER_DECODE", None)
        else:
            os.environ["LOONG_EAGER_DECODE"] = old


def med(xs) -> float:
    return statistics.median(xs)


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a --quick run's differences can be 0)."""
    return a / b if b else float("nan")


def per_s(t: float) -> float:
    return ratio(1.0, t)


def weights_section(loaded, runs: int, bw: float) -> dict:
    import torch
    import torch.nn.functional as F
    from loong import ops
    from loong.model.llama import LlamaModel
    model = LlamaModel(loaded.config, dtype=torch.bfloat16)
    model.load_hf_weights(loaded.weights)
    mats = [p for layer in model.layers for p in (layer.qkv, layer.o_proj, layer.gate_up,
                                                  layer.down)]
    mats.append(model.embed if model.lm_head is None else model.lm_head)
    mats = [m.detach() for m in mats]
    q8 = model.projections() if model.quantize_q8_0() else []   # rounded, blocks kept
    nbytes = sum(m.numel() * 2 for m in mats)
    q8_bytes = int(nbytes * 1.125 / 2)
    out = {"bytes": nbytes, "q8_bytes": q8_bytes, "rows": {}}
    for rows in (1, 4, 8):
        xs = {k: torch.randn(rows, k).bfloat16() for k in {m.shape[1] for m in mats}}
        res, secs = {}, {}
        runs_ = (("F.linear", F.linear, mats, nbytes), ("ops.linear", ops.linear, mats, nbytes),
                 ("q8_0", ops.linear, q8, q8_bytes))
        for name, fn, ws, nb in runs_:
            if not ws:
                continue
            for m in ws:
                fn(xs[m.shape[1]], m)
            ts = []
            for _ in range(max(runs, 3)):
                t0 = time.perf_counter()
                for m in ws:
                    fn(xs[m.shape[1]], m)
                ts.append(time.perf_counter() - t0)
            res[name] = nb / med(ts) / 1e9
            secs[name] = med(ts)
        out["rows"][str(rows)] = res
        out["rows"][str(rows) + "_ms"] = {k: v * 1e3 for k, v in secs.items()}
        kernel = "skinny kernel" if rows < ops.PACKED_MIN_ROWS else "packed kernel"
        line = (f"weights, {rows} row(s): {kernel} {res['ops.linear']:.1f} GB/s "
                f"({res['ops.linear'] / bw:.0%} of read bandwidth), F.linear "
                f"{res['F.linear']:.1f} GB/s: {res['ops.linear'] / res['F.linear']:.2f}x")
        if "q8_0" in res:
            line += (f"; q8_0 kernel {res['q8_0']:.1f} GB/s of blocks ({res['q8_0'] / bw:.0%}), "
                     f"{secs['q8_0'] * 1e3:.2f} ms vs {secs['ops.linear'] * 1e3:.2f} ms bf16: "
                     f"{secs['ops.linear'] / secs['q8_0']:.2f}x")
        print(line, flush=True)
    return out


def batch1_section(a, loaded) -> dict:
    from loong import LLM
    out = {}
    vocab = loaded.config.vocab_size
    for n, contexts in ((1, a.contexts), (2, a.contexts[:1])):
        if n not in a.instances:
            continue
        with LLM(loaded=loaded, dtype="bfloat16", instances=n,
                 kv_capacity_tokens=max(a.contexts) + a.output_len + 64,
                 enable_prefix_caching=False) as llm:
            r = LoongRunner(llm)
            for c in contexts:
                ts = step_times(r, [prompt_ids(c, vocab)], a.output_len, a.runs)
                out[f"{n}x{c}"] = ts
                print(f"batch 1, {n} instance(s), context {c}: {med(ts) * 1e3:.1f} ms per token "
                      f"({per_s(med(ts)):.1f} tokens/s) {[round(t * 1e3, 1) for t in ts]}", flush=True)
    if "q8_0" in a.weight_dtypes and 1 in a.instances:
        with LLM(loaded=loaded, dtype="bfloat16", weight_dtype="q8_0", instances=1,
                 kv_capacity_tokens=max(a.contexts) + a.output_len + 64,
                 enable_prefix_caching=False) as llm:
            r = LoongRunner(llm)
            for c in a.contexts:
                ts = step_times(r, [prompt_ids(c, vocab)], a.output_len, a.runs)
                out[f"1x{c}/q8_0"] = ts
                base = out.get(f"1x{c}")
                vs = f", {ratio(med(base), med(ts)):.2f}x bf16" if base else ""
                print(f"batch 1, 1 instance, context {c}, q8_0 weights: {med(ts) * 1e3:.1f} ms "
                      f"per token ({per_s(med(ts)):.1f} tokens/s){vs} "
                      f"{[round(t * 1e3, 1) for t in ts]}", flush=True)
    if "1x%d" % a.contexts[0] in out and "2x%d" % a.contexts[0] in out:
        r = ratio(med(out["2x%d" % a.contexts[0]]), med(out["1x%d" % a.contexts[0]]))
        print(f"2 instances / 1 instance TPOT: {r:.2f}x")
    return out


def fixed_section(a, loaded) -> dict:
    from loong import LLM
    from loong.model.random_weights import random_model
    tiny = random_model(loaded, num_layers=30, hidden_size=64, num_heads=a.fixed_heads,
                        num_kv_heads=max(1, a.fixed_heads // 2))
    print(f"fixed-cost model: 30 layers, hidden 64, {a.fixed_heads} heads of size "
          f"{64 // a.fixed_heads}", flush=True)
    out = {}
    prompt = [prompt_ids(64, tiny.config.vocab_size)]
    for n in a.instances:
        for mode in ("eager", "native"):
            with eager_decode(mode == "eager"), LLM(loaded=tiny, dtype="bfloat16", instances=n,
                                                    enable_prefix_caching=False) as llm:
                ts = step_times(LoongRunner(llm), prompt, a.fixed_tokens, a.runs)
                if n > 1 and mode == "native":
                    out[f"{n}/control_plane"] = control_plane(llm, prompt, a.fixed_tokens, a.runs)
            out[f"{n}/{mode}"] = ts
        e, nat = med(out[f"{n}/eager"]), med(out[f"{n}/native"])
        print(f"fixed cost, {n} instance(s): native {nat * 1e3:.2f} ms per step, eager "
              f"{e * 1e3:.2f} ms: {ratio(e, nat):.2f}x", flush=True)
        if n > 1:
            cp = out[f"{n}/control_plane"]
            print(f"control plane of a {n}-instance step (step time minus the busiest "
                  f"instance's compute): {med(cp) * 1e3:.2f} ms {[round(x * 1e3, 2) for x in cp]}",
                  flush=True)
    return out


def control_plane(llm, prompt, tokens: int, runs: int) -> list[float]:
    """Per run: (wall time of `tokens` decode steps - the busiest instance's compute time in
    them, from the instances' counters) / steps: what the manager and the control messages
    add to a step whose data plane does nothing (one request on one instance)."""
    from loong import SamplingParams
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    out = []
    for _ in range(runs):
        before = llm.engine.cluster_stats()["instances"]
        t0 = time.perf_counter()
        llm.generate(prompt, sp)
        wall = time.perf_counter() - t0
        after = llm.engine.cluster_stats()["instances"]
        busiest = max(after[r]["compute_s"] - before.get(r, {}).get("compute_s", 0.0)
                      for r in after)
        out.append((wall - busiest) / tokens)
    return out


def step_flops(cfg, rows: int, context: int) -> float:
    """FLOPs of one decode step: 2 x (projection + LM head parameters) per row, plus q.k and
    p.v over the context."""
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h \
        + 3 * h * cfg.intermediate_size
    params = cfg.num_layers * per_layer + cfg.vocab_size * h
    attn = cfg.num_layers * 4 * cfg.num_heads * d * context
    return rows * (2.0 * params + attn)


def pure_decode_steps(llm, prompts: list[list[int]], n: int) -> list[float]:
    """Wall time of each engine step in which every prompt's row decodes (prefills done,
    nothing finished yet): `n` steps at most. The by-difference time of `step_times` also
    counts the steps where the last prompt chunks run beside the first decodes."""
    from loong import SamplingParams
    eng = llm.engine
    sp = SamplingParams(max_tokens=n + 8, temperature=0.0, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, sp)

    def all_decoding(plan) -> bool:
        items = [it for g in plan.groups() for it in g.items] if plan is not None else []
        return len(items) == len(prompts) and all(
            len(getattr(it, "token_ids", (0,))) == 1 and not getattr(it, "extend", ())
            for it in items)

    times: list[float] = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t0
        if len(times) < n and all_decoding(eng.last_plan) and not any(o.finished for o in outs):
            times.append(dt)
    return times


def batched_section(a, loaded) -> dict:
    """Per run: the bf16 matmul limit, then the batch's decode steps, so each share is
    taken against the limit of its own moment (this machine's limit drifts by 2x)."""
    from loong import LLM
    out = {}
    vocab = loaded.config.vocab_size
    with LLM(loaded=loaded, dtype="bfloat16", enable_prefix_caching=False,
             kv_capacity_tokens=max(a.batches) * (a.batch_prompt_len + a.output_len + 32),
             max_num_seqs=max(a.batches)) as llm:
        r = LoongRunner(llm)
        for b in a.batches:
            prompts = [prompt_ids(a.batch_prompt_len, vocab, s) for s in range(b)]
            ts = step_times(r, prompts, a.output_len, a.runs)
            flops = step_flops(loaded.config, b, a.batch_prompt_len + a.output_len // 2)
            limits, steps, shares = [], [], []
            for _ in range(a.runs):
                lim = bc.matmul_limit(n=1024 if a.quick else 2048,
                                      reps=3 if a.quick else 5)["median_gflops"]
                st = med(pure_decode_steps(llm, prompts, a.output_len))
                limits.append(lim)
                steps.append(st)
                shares.append(flops / st / 1e9 / lim)
            gf = ratio(flops, med(ts)) / 1e9
            out[str(b)] = {"step_s": ts, "gflops": gf, "limit_gflops": limits,
                           "pure_step_s": steps, "pure_share_of_limit": shares,
                           "share_of_limit": med(shares)}
            print(f"batch {b}: {med(ts) * 1e3:.1f} ms per step by difference (as the peers), "
                  f"{ratio(b, med(ts)):.0f} tokens/s; a pure decode step {med(steps) * 1e3:.1f} "
                  f"ms, {flops / med(steps) / 1e9:.0f} GFLOP/s = {med(shares):.0%} of the bf16 "
                  f"matmul limit measured before it (median of {[round(x) for x in limits]}; "
                  f"per run {[f'{x:.0%}' for x in shares]})", flush=True)
    return out


def run_peer(a, engine: str, python: str, model: str, batches: list[int]) -> dict | None:
    argv = [python, os.path.join(HERE, "decode_peers.py"), "--engine", engine, "--model", model,
            "--contexts", ",".join(map(str, a.contexts)), "--batches", ",".join(map(str, batches)),
            "--batch-prompt-len", str(a.batch_prompt_len), "--output-len", str(a.output_len),
            "--runs", str(a.runs), "--threads", str(a.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    print(f"{engine}: running {' '.join(argv[1:4])} ...", flush=True)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=a.peer_timeout)
    for line in p.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT "):])
    print(f"{engine} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
    return None


def peers_section(a, loaded, loong_b1: dict, loong_batched: dict) -> dict:
    from loong.model.default_model import default_model_path
    out = {}
    tmp = tempfile.mkdtemp(prefix="loong-decode-hf-")
    for engine, python in (("vllm", a.vllm_python), ("llamacpp", a.llamacpp_python)):
        if not python or not os.path.exists(python):
            print(f"{engine}: not installed at {python!r}; skipped", flush=True)
            continue
        if engine == "vllm":
            model = os.path.join(tmp, "hf")
            from loong.model.hf_export import export_hf
            export_hf(loaded, model, dtype="bfloat16")
            batches = a.batches
        else:
            model, batches = default_model_path(), []
        res = run_peer(a, engine, python, model, batches)
        if res is None:
            continue
        out[engine] = res
        for c, ts in res["batch1"].items():
            mine = loong_b1.get(f"1x{c}")
            vs = f", Loong is {ratio(med(ts), med(mine)):.2f}x faster" if mine else ""
            print(f"{engine} {res['version']} batch 1, context {c}: {med(ts) * 1e3:.1f} ms per "
                  f"token ({per_s(med(ts)):.1f} tokens/s){vs}", flush=True)
        for b, ts in res["batched"].items():
            mine = loong_batched.get(b)
            vs = f", Loong is {ratio(med(ts), med(mine['step_s'])):.2f}x faster" if mine else ""
            print(f"{engine} batch {b}: {med(ts) * 1e3:.1f} ms per step{vs}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run, 8 tokens, small workloads")
    p.add_argument("--sections", default="weights,batch1,fixed,batched,peers")
    p.add_argument("--instances", default="1,2")
    p.add_argument("--contexts", default=None, help="batch-1 contexts (default 64,2048)")
    p.add_argument("--batches", default=None, help="batched sizes (default 32,64)")
    p.add_argument("--batch-prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=None, help="default 64 (quick 8)")
    p.add_argument("--fixed-tokens", type=int, default=None, help="default 128 (quick 8)")
    p.add_argument("--weight-dtypes", default="auto,q8_0",
                   help="batch-1 weight formats on 1 instance (auto = bf16; q8_0 as well)")
    p.add_argument("--fixed-heads", type=int, default=2,
                   help="attention heads of the fixed-cost model (hidden 64; default 2: size 32)")
    p.add_argument("--runs", type=int, default=None, help="default 3 (quick 1)")
    p.add_argument("--threads", type=int, default=2, help="threads of the peer engines")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    p.add_argument("--llamacpp-python", default=DEFAULT_LLAMACPP_PYTHON)
    p.add_argument("--peer-timeout", type=float, default=1800.0)
    p.add_argument("--json", default=os.path.join(RESULTS, "decode_latency.json"))
    a = p.parse_args(argv)
    q = a.quick
    a.contexts = [int(x) for x in (a.contexts or ("64,256" if q else "64,2048")).split(",")]
    a.batches = [int(x) for x in (a.batches or ("4" if q else "32,64")).split(",")]
    a.output_len = a.output_len or (8 if q else 64)
    a.fixed_tokens = a.fixed_tokens or (8 if q else 128)
    a.runs = a.runs or (1 if q else 3)
    a.instances = [int(x) for x in a.instances.split(",")]
    a.weight_dtypes = a.weight_dtypes.split(",")
    sections = set(a.sections.split(","))
    if q:
        sections.discard("peers")
    from loong.model.loader import load_model_files
    loaded = load_model_files(None)
    bw = read_bandwidth_gbs()
    results = {"machine": bc.machine_info(), "read_gbs": bw, "runs": a.runs,
               "output_len": a.output_len}
    weight_bytes = sum(t.numel() for t in loaded.weights.values()) * 2
    floor = weight_bytes / (bw * 1e9)
    results.update(weight_bytes_bf16=weight_bytes, floor_tpot_s=floor)
    print(f"bf16 weight-streaming floor: {weight_bytes / 1e6:.0f} MB at {bw:.1f} GB/s = "
          f"{floor * 1e3:.1f} ms per token ({1 / floor:.0f} tokens/s)", flush=True)
    if "weights" in sections:
        results["weights"] = weights_section(loaded, a.runs, bw)
    b1 = results["batch1"] = batch1_section(a, loaded) if "batch1" in sections else {}
    if "fixed" in sections:
        results["fixed"] = fixed_section(a, loaded)
    batched = {}
    if "batched" in sections:
        batched = results["batched"] = batched_section(a, loaded)
        results["matmul_limit_gflops"] = med([x for v in batched.values()
                                              for x in v["limit_gflops"]])
    if "peers" in sections:
        results["peers"] = peers_section(a, loaded, b1, batched)
    bc.write_json(a.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
