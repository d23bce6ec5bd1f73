"""Batch-1 decode latency: time per output token of one stream, on one instance and on a
local cluster of 2 instances (SmolLM2-135M bf16 by default, 64-token prompt, greedy).

For each configuration the engine is built once and warmed up; then `--runs` times one
request of `--prompt-len` prompt tokens and `--output-len` output tokens is run alone, and
its time per output token after the first (TPOT) is taken. Prints the median over the runs,
tokens/s, and the ratio of 2 instances to 1; also the bf16 weight-streaming floor (weight
bytes / measured read bandwidth) for reference.

    python experiments/decode_latency.py --quick     # 1 run of 16 tokens per configuration
    python experiments/decode_latency.py             # 3 runs of 128 tokens
    python experiments/decode_latency.py --instances 1 --runs 5

Writes experiments/results/decode_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "experiments", "results")


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


def tpot_runs(llm, prompt: list[int], output_len: int, runs: int) -> list[float]:
    from loong import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    out = []
    for _ in range(runs):
        o = llm.generate(prompt, params)[0]
        out.append(o.tpot)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 run of 16 tokens per configuration")
    p.add_argument("--instances", default="1,2", help="instance counts to measure")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=None, help="default 128 (quick 16)")
    p.add_argument("--runs", type=int, default=None, help="default 3 (quick 1)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=os.path.join(RESULTS, "decode_latency.json"))
    args = p.parse_args(argv)
    output_len = args.output_len or (16 if args.quick else 128)
    runs = args.runs or (1 if args.quick else 3)
    from loong import LLM
    from loong.model.loader import load_model_files
    loaded = load_model_files(args.model)
    prompt = [(1000 + 37 * i) % loaded.config.vocab_size for i in range(args.prompt_len)]
    results = {"prompt_len": args.prompt_len, "output_len": output_len, "runs": runs,
               "configs": {}}
    for n in (int(x) for x in args.instances.split(",")):
        with LLM(args.model, loaded=loaded, dtype=args.dtype, instances=n) as llm:
            tpots = tpot_runs(llm, prompt, output_len, runs)
        med = statistics.median(tpots)
        results["configs"][str(n)] = {"tpot_s": tpots, "median_tpot_s": med,
                                      "tokens_per_s": 1.0 / med}
        print(f"{n} instance(s): median {med * 1e3:.1f} ms per token ({1 / med:.1f} tokens/s) "
              f"over {runs} run(s): {[round(t * 1e3, 1) for t in tpots]}", flush=True)
    cfgs = results["configs"]
    if "1" in cfgs and "2" in cfgs:
        ratio = cfgs["2"]["median_tpot_s"] / cfgs["1"]["median_tpot_s"]
        results["ratio_2_to_1"] = ratio
        print(f"2 instances / 1 instance TPOT: {ratio:.2f}x")
    import torch
    weight_bytes = sum(t.numel() for t in loaded.weights.values()) * torch.finfo(torch.bfloat16).bits // 8
    bw = read_bandwidth_gbs()
    floor = weight_bytes / (bw * 1e9)
    results.update(weight_bytes_bf16=weight_bytes, read_gbs=bw, floor_tpot_s=floor)
    print(f"bf16 weight-streaming floor: {weight_bytes / 1e6:.0f} MB at {bw:.1f} GB/s = "
          f"{floor * 1e3:.1f} ms per token ({1 / floor:.0f} tokens/s)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
