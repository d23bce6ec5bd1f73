"""Cancel/abort soak, longer than the test suite's: a live `loong serve` (2 CPU instances,
the embedded SmolLM2 in bf16 by default) gets many concurrent streams, each ended at a
random moment by one of the ways a call can end (cancel before admission, during prefill,
during decode, gRPC deadline, the Abort RPC, server-side timeout_s; plus a control group
that completes), in several rounds.

Prints per round and in total: requests sent, completed, aborted by cause (server side),
rejected by cause, calls the server never saw, unexpected outcomes, KV blocks leaked once
idle (must be 0), and the resident memory of the server and its instances before and after.

    python experiments/cancel_soak.py --quick        # 1 round of 120 calls, ~15 s
    python experiments/cancel_soak.py                 # 5 rounds of 400 calls
    python experiments/cancel_soak.py --model PATH --rounds 10 --requests 1000

Writes experiments/results/cancel_soak.json (or --json PATH). Exits 1 if a KV block leaked
or an outcome was unexpected.

Memory: the instances' RSS grows by some tens of MiB per round of new batch shapes; that is
oneDNN's primitive cache (JIT kernels per matmul shape, up to 1024 entries by default), not
a leak: with ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 it stays flat after the first round, and the
instances' Python objects and per-request tables return to their idle size every round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from loong.tools.server_process import ServerProcess  # noqa: E402
from loong.tools.cancel_soak import plan_soak, run_soak  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes together (MiB), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 120 calls")
    p.add_argument("--model", default=None, help="model path (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--kv-capacity-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=None, help="default 5 (quick 1)")
    p.add_argument("--requests", type=int, default=None, help="calls per round (default 400, quick 120)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(RESULTS, "cancel_soak.json"),
                   help="result file (default experiments/results/cancel_soak.json)")
    args = p.parse_args(argv)
    # SIGTERM -> SystemExit, so the finally blocks stop the server and its instances.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rounds = args.rounds or (1 if args.quick else 5)
    per_round = args.requests or (120 if args.quick else 400)
    srv_args = ["--instances", str(args.instances), "--kv-capacity-tokens",
                str(args.kv_capacity_tokens), "--dtype", args.dtype]
    if args.model:
        srv_args += ["--model", args.model]
    srv = ServerProcess(srv_args, cwd=ROOT)
    out = {"rounds": [], "config": vars(args)}
    try:
        from loong.client import LoongClient
        with LoongClient(srv.address, timeout=60) as c:
            vocab = c.model_info()["vocab_size"]
        pids = [srv.proc.pid, *srv.children()]
        rss0 = rss_mib(pids)
        print(f"server {srv.address}: {len(pids)} processes (manager, instances, helpers), "
              f"RSS {rss0:.0f} MiB")
        totals = {"sent": 0, "completed": 0, "unseen": 0, "aborts": {}, "rejections": {},
                  "unexpected": 0, "leaked": 0}
        for r in range(rounds):
            calls = plan_soak(per_round, vocab=vocab, seed=args.seed + r)
            t0 = time.perf_counter()
            rep = asyncio.run(run_soak(srv.address, calls, concurrency=args.concurrency))
            aborts, rejections = rep.delta("aborts") or {}, rep.delta("rejections") or {}
            unseen = rep.sent - rep.delta("received")
            row = {"round": r, "sent": rep.sent, "completed": rep.completed,
                   "aborted": aborts, "rejected": rejections, "unseen": unseen,
                   "unexpected": rep.unexpected, "blocks_leaked": rep.blocks_leaked,
                   "by_way": dict(rep.by_way), "seconds": time.perf_counter() - t0,
                   "rss_mib": rss_mib(pids)}
            out["rounds"].append(row)
            print(f"round {r}: sent {rep.sent}, completed {rep.completed}, aborted "
                  f"{sum(aborts.values())} {dict(sorted(aborts.items()))}, rejected "
                  f"{dict(rejections)}, never seen by the server {unseen}, unexpected "
                  f"{len(rep.unexpected)}, blocks leaked {rep.blocks_leaked}, "
                  f"{row['seconds']:.1f}s, RSS {row['rss_mib']:.0f} MiB", flush=True)
            totals["sent"] += rep.sent
            totals["completed"] += rep.completed
            totals["unseen"] += unseen
            totals["unexpected"] += len(rep.unexpected)
            totals["leaked"] += rep.blocks_leaked
            for k, v in aborts.items():
                totals["aborts"][k] = totals["aborts"].get(k, 0) + v
            for k, v in rejections.items():
                totals["rejections"][k] = totals["rejections"].get(k, 0) + v
        rss1 = rss_mib(pids)
        totals.update(rss_before_mib=rss0, rss_after_mib=rss1)
        out["totals"] = totals
        print(f"\ntotal: sent {totals['sent']}, completed {totals['completed']}, aborted "
              f"{sum(totals['aborts'].values())} {dict(sorted(totals['aborts'].items()))}, "
              f"rejected {totals['rejections'] or 0}, never seen {totals['unseen']}, "
              f"unexpected {totals['unexpected']}, blocks leaked {totals['leaked']} (must be 0)")
        print(f"server + instances RSS: {rss0:.0f} MiB before, {rss1:.0f} MiB after "
              f"({rss1 - rss0:+.0f} MiB)")
    finally:
        srv.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0 if out.get("totals", {}).get("leaked", 1) == 0 and not out["totals"]["unexpected"] else 1


if __name__ == "__main__":
    sys.exit(main())
