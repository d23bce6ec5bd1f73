"""The `loong` console script.

`loong generate --prompt TEXT [--max-tokens N] [--instances N]` runs the offline engine
(on N instance processes with the ESP data plane when N > 1); several
`--prompt`s or a `--prompts-file` (one prompt per line) make a batch with a progress bar.
`loong profile --instances N --out profile.json --preset-out preset.json [--quick] [--serving]`
measures local instances and fits a cost-model preset (loong/tools/profiler.py); --serving
then calibrates the simulator's serving overhead against a real server
(loong/tools/serving_probe.py, loong/sim/calibrate.py).
`loong serve [--instances N] [--port P] ...` runs the gRPC server (loong/serve/serve_main.py);
`loong client generate|info|stats|health|abort` talks to one (loong/client/cli.py);
`loong instance --manager HOST:PORT` joins a manager under torchrun.
Errors in the input exit with status 2 and a one-line message naming the field.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--weight-dtype", default="auto", choices=["auto", "q8_0"],
                   help="q8_0: projections rounded to 8-bit blocks, streamed by small-batch "
                        "decode steps (CPU; faster single-stream decode)")
    g.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache size in tokens")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--instances", type=int, default=1,
                   help="instance processes (ESP data plane); KV options are per instance")
    g.add_argument("--decode-masters", type=int, default=None,
                   help="decode masters per step (default: sticky, scale up when full)")
    g.add_argument("--prefill-group-size", type=int, default=None,
                   help="instances per prefill group (default: all)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loong", description="Loong: long-context LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline (one instance or a local cluster)")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    gen.add_argument("--prompts-file", default=None, help="file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    sim = sub.add_parser("sim", help="simulate a cluster serving a workload (no model, no GPU)")
    sim.add_argument("--workload", required=True,
                     help="sharegpt, sharegpt-loong, leval, lveval, mixed, zipf-<alpha>, azure-code, azure-conv, "
                          "mooncake, arxiv or jsonl:PATH")
    sim.add_argument("--policy", default="elastic",
                     help="elastic, static-sp, chunked-prefill (LightLLM SplitFuse), sarathi "
                          "(one token budget per iteration), vllm, pd-disagg or simple")
    sim.add_argument("--queue", default="fcfs", help="queue discipline: fcfs, mlfq, sjf or ltr (longest predicted output first, for RL rollouts)")
    sim.add_argument("--replica-size", type=int, default=None,
                     help="instances per baseline replica (default: the paper's TP8/TP4)")
    sim.add_argument("--token-budget", type=int, default=None,
                     help="chunked-prefill: tokens per prompt per iteration; sarathi: tokens per "
                          "iteration (default: the paper's SplitFuse block per workload)")
    sim.add_argument("--instances", type=int, default=4)
    sim.add_argument("--rate", type=float, default=1.0,
                     help="requests/s; 0 replays a trace's real arrival times")
    sim.add_argument("--requests", type=int, default=500)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--preset", default="a800-lwm7b-tp2",
                     help="cost-model preset name or a JSON file from the profiler")
    sim.add_argument("--data-dir", default=None,
                     help="folder with the trace files (default: ../shared/data when present)")
    sim.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    sim.add_argument("--cv", type=float, default=1.0, help="gamma arrivals' coefficient of variation")
    sim.add_argument("--prefix-caching", action="store_true",
                     help="the policy caches and shares full KV blocks (prefix reuse from a "
                          "trace's hash_ids, e.g. mooncake)")
    sim.add_argument("--json", default=None, help="write the metrics JSON here")
    from loong.client.cli import add_client_parser
    from loong.serve.serve_main import add_serve_parser
    _add_engine_args(add_serve_parser(sub))
    add_client_parser(sub)
    from loong.tools.bench import add_bench_parser
    add_bench_parser(sub)
    inst = sub.add_parser("instance", help="run one instance that joins a manager (under torchrun)",
                          add_help=False)
    inst.add_argument("instance_args", nargs=argparse.REMAINDER)
    prof = sub.add_parser("profile", help="measure local instances and fit a cost-model preset")
    prof.add_argument("--instances", type=int, default=2, help="instance processes (group sizes 1..N)")
    prof.add_argument("--model", default=None,
                      help="GGUF file or Hugging Face directory (default: embedded SmolLM2-135M-Instruct)")
    prof.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    prof.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    prof.add_argument("--threads", type=int, default=None,
                      help="threads per instance (default: CPU cores / instances)")
    prof.add_argument("--kv-capacity-tokens", type=int, default=None,
                      help="KV per instance in tokens (default: the engine's)")
    prof.add_argument("--quick", action="store_true", help="a small grid (about a minute on CPU)")
    prof.add_argument("--repeats", type=int, default=None, help="repeats per point (default: the grid's)")
    prof.add_argument("--stat", default="min", choices=["min", "median"],
                      help="which of a point's repeats is its time")
    prof.add_argument("--max-foreign-cpu", type=float, default=0.25,
                      help="retry a measurement while other processes used more than this share "
                           "of the machine's CPU (1 = never retry)")
    prof.add_argument("--name", default=None, help="cost-model name (default: the --preset-out file name)")
    prof.add_argument("--out", default="profile.json", help="raw samples (JSON)")
    prof.add_argument("--preset-out", default=None, help="fitted CostModel JSON (for --preset / load_cost_model)")
    prof.add_argument("--refit", default=None, metavar="PROFILE_JSON",
                      help="fit from a raw profile written earlier instead of measuring (its "
                           "serving calibration too, when it has one)")
    prof.add_argument("--serving", action="store_true",
                      help="then calibrate the simulator against a real `loong serve` on "
                           "--instances (Poisson runs of short requests, about a minute): "
                           "the cost model's serving overhead (loong/sim/calibrate.py)")
    return parser


def cmd_profile(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    for name in ("instances", "threads", "repeats", "kv_capacity_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"{name}: must be a positive int, got {v}")
    if not 0 < args.max_foreign_cpu <= 1:
        raise ValueError(f"max_foreign_cpu: must be in (0, 1], got {args.max_foreign_cpu}")
    from loong.sched.profile_fit import fit_profile, fit_warnings, summary_table
    from loong.tools.profiler import default_grid, run_profile
    if args.refit:
        with open(args.refit, encoding="utf-8") as f:
            raw = json.load(f)
    else:
        from loong.worker.build import resolve_device
        grid = default_grid(args.quick, resolve_device(args.device).type)
        if args.repeats:
            grid = dataclasses.replace(grid, repeats=args.repeats)
        raw = run_profile(args.model, args.instances, device=args.device, dtype=args.dtype,
                          threads=args.threads, grid=grid, stat=args.stat,
                          kv_capacity_tokens=args.kv_capacity_tokens,
                          max_foreign_cpu=args.max_foreign_cpu)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
        print(f"raw profile ({len(raw['prefill'])} prefill, {len(raw['decode'])} decode, "
              f"{len(raw['migration'])} migration points, {raw['retries']} retries under foreign "
              f"load, {raw['wall_s']:.0f} s) -> {args.out}")
    name = args.name or (os.path.splitext(os.path.basename(args.preset_out))[0] if args.preset_out
                         else "profiled")
    cm = fit_profile(raw, name)
    print(summary_table(cm))
    for line in fit_warnings(cm):
        print(line, file=sys.stderr)
    if args.serving:
        raw["serving"] = _probe_serving(args, cm, raw)
        with open(args.refit or args.out, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
    if raw.get("serving"):
        from loong.sim.calibrate import fit_serving_overhead
        overhead, report = fit_serving_overhead(cm, raw["serving"])
        cm = dataclasses.replace(cm, serving=overhead)
        print(f"serving overhead: {overhead.a_ms:.2f} ms per group step + "
              f"{overhead.b_ms_per_row:.3f} ms per sequence, x(1 + "
              f"{overhead.parallel_slowdown:.3f} per other busy instance); mean |relative "
              f"error| of the simulated runs {report['error_before']} -> {report['error_after']}")
    if args.preset_out:
        with open(args.preset_out, "w", encoding="utf-8") as f:
            f.write(cm.to_json() + "\n")
        print(f"cost model -> {args.preset_out}")
    return 0


def _probe_serving(args: argparse.Namespace, cm, raw: dict) -> dict:
    """Measure a real server with the cost model `cm` just fitted (`serving_probe`), set up
    as the profile `raw` was (instances, threads per instance, device, dtype)."""
    import os
    import tempfile

    from loong.tools.serving_probe import QUICK_POINTS, DEFAULT_POINTS, measure_serving
    with tempfile.TemporaryDirectory(prefix="loong-profile-") as d:
        path = os.path.join(d, "cost_model.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(cm.to_json())
        return measure_serving(raw["instances"], cm.tokens_per_instance, model=args.model,
                               dtype=raw["dtype"], device=raw["device"], cost_model=path,
                               points=QUICK_POINTS if args.quick else DEFAULT_POINTS,
                               threads=raw["threads_per_instance"])


def cmd_sim(args: argparse.Namespace) -> int:
    from loong.sim.run import run_simulation
    from loong.sim.workloads import default_data_dir
    out = run_simulation(args.workload, args.policy, args.instances,
                         None if args.rate == 0 else args.rate, args.requests, args.seed,
                         args.preset, args.data_dir or default_data_dir(), args.arrival, args.cv,
                         queue=args.queue, replica_size=args.replica_size,
                         token_budget=args.token_budget, prefix_caching=args.prefix_caching)
    m = out["metrics"]
    print(f"{args.policy} on {args.instances} instances, {args.workload} at "
          f"{args.rate or 'trace'} req/s, {m['count']} requests, {out['simulated_s']:.1f} s "
          f"simulated in {out['wall_s']:.1f} s")
    for k in ("ttft", "tpot", "e2e", "per_token", "input_token", "output_token"):
        v = m.get(k)
        if v:
            print(f"  {k:13s} mean {v['mean'] * 1e3:10.2f} ms  p50 {v['p50'] * 1e3:10.2f}  "
                  f"p90 {v['p90'] * 1e3:10.2f}  p99 {v['p99'] * 1e3:10.2f}")
    if m.get("slo"):
        print(f"  normalized by the paper's SLO: {m['slo']['normalized']}")
    pc = out["prefix_cache"]
    if args.prefix_caching and pc:
        print(f"  prefix cache: {pc['hit_rate']:.1%} of prompt tokens hit "
              f"({pc['hit_tokens']} of {pc['queried_tokens']}), {pc['evicted']} blocks evicted")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from loong import LLM, SamplingParams
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        raise ValueError("prompt: give --prompt TEXT or --prompts-file PATH")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, weight_dtype=args.weight_dtype,
              kv_capacity_tokens=args.kv_capacity_tokens,
              block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, instances=args.instances,
              decode_masters=args.decode_masters, prefill_group_size=args.prefill_group_size)
    load_s = time.perf_counter() - t0
    try:
        return _generate(args, llm, prompts, params, load_s)
    finally:
        llm.close()


def _generate(args, llm, prompts, params, load_s: float) -> int:
    t0 = time.perf_counter()
    show_bar = len(prompts) > 1 and sys.stderr.isatty()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=show_bar)
    else:
        outs = llm.generate(prompts, params, use_tqdm=show_bar)
    gen_s = time.perf_counter() - t0
    for prompt, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "ttft_s": o.ttft, "tpot_s": o.tpot}))
        else:
            print(f"--- prompt: {prompt!r}\n{o.text}\n[finish_reason={o.finish_reason}, "
                  f"{len(o.token_ids)} tokens, ttft={o.ttft * 1e3:.0f} ms"
                  + (f", tpot={o.tpot * 1e3:.1f} ms" if o.tpot else "") + "]")
    total = sum(len(o.token_ids) for o in outs)
    print(f"loaded model in {load_s:.1f}s; generated {total} tokens for {len(outs)} prompts in "
          f"{gen_s:.2f}s ({total / max(gen_s, 1e-9):.1f} tok/s)", file=sys.stderr)
    if hasattr(llm.engine, "cluster_stats"):
        print(_describe_cluster(llm.engine.cluster_stats()), file=sys.stderr)
    return 0


def _describe_cluster(stats: dict) -> str:
    p = stats["policy"]
    if "iterations" in p:             # the replica baselines (chunked-prefill, pd-disagg)
        lines = [f"cluster: {p['iterations']} replica iterations ({p['prefill_only']} prefill "
                 f"only, {p['mixed']} mixed, {p['decode_only']} decode only), "
                 f"{p['transfers']} PD transfers, {p['preemptions']} preemptions"]
    else:
        lines = [f"cluster: {p['prefill_steps']} prefill steps (group sizes {p['group_sizes']}), "
                 f"{p['decode_steps']} decode steps (masters per step {p['masters']}), "
                 f"{p['scale_ups']} scale-ups, {p['migrations']} migrations, "
                 f"{p['preemptions']} preemptions"]
    for r, c in sorted(stats["instances"].items()):
        lines.append(f"  instance {r}: sent {c['bytes_sent'] / 2**20:.1f} MiB, received "
                     f"{c['bytes_recv'] / 2**20:.1f} MiB, {c['ring_steps']} ring steps, "
                     f"compute {c['compute_s']:.2f}s (sampler {c['sample_s']:.2f}s), waiting "
                     f"on peers {c['comm_wait_s']:.2f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["instance"]:      # its own parser (loong.cluster.instance_main)
        from loong.cluster.instance_main import main as instance_main
        return instance_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "sim":
            return cmd_sim(args)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "client":
            from loong.client.cli import cmd_client
            return cmd_client(args)
        if args.command == "bench":
            from loong.tools.bench import cmd_bench
            return cmd_bench(args)
        if args.command == "serve":
            from loong.serve.serve_main import cmd_serve
            return cmd_serve(args)
    except ValueError as e:  # InvalidRequestError and ModelLoadError are ValueErrors
        print(f"loong: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
