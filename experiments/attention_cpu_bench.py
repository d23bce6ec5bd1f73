"""Micro-benchmark of CPU paged decode attention (loong.attention.cpu).

Times `paged_decode_attention` and its two strategies (per-row flash calls vs one padded batched
call) for B in {1, 32, 64} x context {512, 2048, 8192}, bf16, SmolLM2 shapes (H=9, Hkv=3, D=64),
block size 16 with shuffled block ids. Also times the flash op on KV that is already contiguous
(no gather: the floor for this op). Reports ms and achieved GB/s of KV read (K+V bytes / time)
next to the machine's memory bandwidth measured in the same run (a read-only reduction and a
copy over a buffer much larger than the caches).

Usage: python experiments/attention_cpu_bench.py [--quick] [--mixed] [--threads N]
                                                [--out results.json]
  --mixed: row lengths uniform in [1, ctx] instead of all equal to ctx (exercises padding).
Must not import: anything beyond torch and loong.attention.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loong.attention import cpu as acpu

H, HKV, D, BS = 9, 3, 64, 16


def _time(fn, reps: int, budget_s: float = 3.0) -> float:
    """Best of `reps` runs (min, not median: the dev host is shared and noisy)."""
    fn()                                             # warm-up
    ts = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(ts) >= 3:
            break
    return min(ts)


def memory_bandwidth(nbytes: int = 512 << 20) -> dict:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_read = _time(lambda: src.sum(), 7)
    t_copy = _time(lambda: dst.copy_(src), 7)
    return {"read_GBps": nbytes / t_read / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


def make_case(B: int, ctx: int, mixed: bool, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if mixed:
        lens = torch.randint(1, ctx + 1, (B,), generator=g)
    else:
        lens = torch.full((B,), ctx)
    nblk = -(-ctx // BS)
    num_blocks = B * nblk + 1
    k_cache = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[:B * nblk]
    block_tables = perm.view(B, nblk).to(torch.int32)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, block_tables, lens.to(torch.int32)


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = memory_bandwidth()
    print(f"threads={torch.get_num_threads()} memory read {bw['read_GBps']:.1f} GB/s, "
          f"copy (r+w) {bw['copy_GBps']:.1f} GB/s")
    Bs = [1, 32] if args.quick else [1, 32, 64]
    ctxs = [512, 2048] if args.quick else [512, 2048, 8192]
    rows = []
    scale = D ** -0.5
    hdr = (f"{'B':>3} {'ctx':>5} {'KV MB':>7} | {'auto ms':>8} {'GB/s':>6} | {'per-row':>8} "
           f"{'batched':>8} | {'no-gather':>9} {'GB/s':>6} | winner")
    print(hdr)
    for B in Bs:
        for ctx in ctxs:
            q, kc, vc, bt, lens = make_case(B, ctx, args.mixed)
            kv_bytes = 2 * int(lens.sum()) * HKV * D * kc.element_size()
            a = (q, kc, vc, bt, lens, scale)
            t_auto = _time(lambda: acpu.paged_decode_attention(*a), args.reps)
            t_row = _time(lambda: acpu.paged_decode_per_row(*a), args.reps)
            t_bat = _time(lambda: acpu.paged_decode_batched(*a), args.reps)
            # Floor: the same attention over pre-gathered contiguous KV (one flash call per row).
            ks = [acpu.gather_kv(kc, vc, bt[b], int(lens[b])) for b in range(B)]

            def nogather():
                for b in range(B):
                    acpu.full_attention(q[b:b + 1], ks[b][0], ks[b][1], scale)
            t_ng = _time(nogather, args.reps)
            del ks
            win = "per-row" if t_row < t_bat else "batched"
            row = {"B": B, "ctx": ctx, "mixed": args.mixed, "kv_MB": kv_bytes / 1e6,
                   "auto_ms": t_auto * 1e3, "per_row_ms": t_row * 1e3,
                   "batched_ms": t_bat * 1e3, "no_gather_ms": t_ng * 1e3,
                   "auto_GBps": kv_bytes / t_auto / 1e9, "no_gather_GBps": kv_bytes / t_ng / 1e9,
                   "auto_frac_of_read_bw": kv_bytes / t_auto / 1e9 / bw["read_GBps"],
                   "winner": win}
            rows.append(row)
            print(f"{B:>3} {ctx:>5} {row['kv_MB']:>7.1f} | {row['auto_ms']:>8.2f} "
                  f"{row['auto_GBps']:>6.1f} | {row['per_row_ms']:>8.2f} "
                  f"{row['batched_ms']:>8.2f} | {row['no_gather_ms']:>9.2f} "
                  f"{row['no_gather_GBps']:>6.1f} | {win}", flush=True)
            del q, kc, vc
    return {"threads": torch.get_num_threads(), "bandwidth": bw, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid (smoke run)")
    p.add_argument("--mixed", action="store_true", help="row lengths uniform in [1, ctx]")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", default=None, help="write JSON results here")
    args = p.parse_args()
    res = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
