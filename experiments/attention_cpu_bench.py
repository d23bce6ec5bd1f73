"""Micro-benchmark of CPU paged decode attention: the C++ kernel (loong.ops) vs torch.

Times, for B in {1, 32, 64} x context {512, 2048, 8192}, bf16 (or --dtype), SmolLM2 shapes
(H=9, Hkv=3, D=64), block size 16 with shuffled block ids:
  * C++: `loong.ops.paged_decode_attention` (csrc/cpu/paged_attention.cpp), reading KV that is
    not in the caches: every call uses a different block table over disjoint blocks of a cache
    of >= --rotate-mb MB (like a decode step walking 30 layers), so small cases are not served
    from L3; "hot" repeats one table (KV cache-resident when it fits: the compute roof);
  * torch: `loong.attention.cpu.paged_decode_attention_torch` (the fallback), same cold setup;
  * with --strategies also its two strategies (per-row flash calls, one padded batched call) and
    the flash op on pre-gathered contiguous KV (the torch floor).
Times are medians (the dev host is shared and noisy); GB/s is K+V bytes read / time, shown
next to the machine's memory bandwidth measured in the same run with the same thread count:
a read-only reduction (`read`) and a copy (`memcpy`, bytes copied per second; the copy moves
twice that). The kernel's target is >= 50% of the read bandwidth at B=64, ctx 2048, 2 threads.

Usage: python experiments/attention_cpu_bench.py [--quick] [--mixed] [--threads 1,2]
           [--dtype bfloat16|float32] [--strategies] [--rotate-mb 256] [--out results.json]
  --mixed: row lengths uniform in [1, ctx] instead of all equal to ctx.
  --quick: B in {1, 32} x context {512, 2048}, cold runs over 64 MB, 1 s per torch
           measurement, unless given (a smoke test, several seconds).
Must not import: anything beyond torch, loong.ops and loong.attention.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loong import ops  # noqa: E402
from loong.attention import cpu as acpu  # noqa: E402

H, HKV, D, BS = 9, 3, 64, 16


def _time(fn, reps: int, budget_s: float = 3.0, stat=statistics.median) -> float:
    """Median (or `stat`) of up to `reps` calls fn(i), i = 0, 1, ...; stops after budget_s once
    it has 3 samples."""
    fn(0)                                            # warm-up
    ts = []
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i + 1)
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(ts) >= 3:
            break
    return stat(ts)


def memory_bandwidth(nbytes: int = 512 << 20) -> dict:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_read = _time(lambda i: src.sum(), 9)
    t_copy = _time(lambda i: dst.copy_(src), 9)
    return {"read_GBps": nbytes / t_read / 1e9, "memcpy_GBps": nbytes / t_copy / 1e9}


def make_case(B: int, ctx: int, mixed: bool, dtype, copies: int = 1, seed: int = 0):
    """q, one cache holding `copies` disjoint sets of blocks, `copies` block tables, lens."""
    g = torch.Generator().manual_seed(seed)
    if mixed:
        lens = torch.randint(1, ctx + 1, (B,), generator=g)
    else:
        lens = torch.full((B,), ctx)
    nblk = -(-ctx // BS)
    num_blocks = copies * B * nblk + 1
    k_cache = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[:copies * B * nblk].to(torch.int32)
    tables = list(perm.view(copies, B, nblk).unbind(0))
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens.to(torch.int32)


def measure_case(args, B: int, ctx: int, dtype, bw: dict) -> tuple[dict, str]:
    """Times one (B, ctx) case; returns its JSON row and its table line. The case's tensors
    (up to --rotate-mb of KV) are freed when this returns."""
    scale = D ** -0.5
    nblk = -(-ctx // BS)
    case_bytes = 2 * B * nblk * BS * HKV * D * torch.finfo(dtype).bits // 8
    copies = max(1, min(256, math.ceil(args.rotate_mb * 1e6 / case_bytes)))
    q, kc, vc, tables, lens = make_case(B, ctx, args.mixed, dtype, copies)
    kv_bytes = 2 * int(lens.sum()) * HKV * D * kc.element_size()

    def call(fn, i):
        return fn(q, kc, vc, tables[i % copies], lens, scale)

    t_cpp = _time(lambda i: call(ops.paged_decode_attention, i), max(args.reps, copies))
    t_hot = _time(lambda i: call(ops.paged_decode_attention, 0), args.reps)
    t_torch = _time(lambda i: call(acpu.paged_decode_attention_torch, i),
                    max(args.reps, min(copies, 32)), budget_s=args.budget)
    row = {"B": B, "ctx": ctx, "mixed": args.mixed, "dtype": args.dtype,
           "kv_MB": kv_bytes / 1e6, "copies": copies,
           "cpp_ms": t_cpp * 1e3, "cpp_GBps": kv_bytes / t_cpp / 1e9,
           "cpp_hot_GBps": kv_bytes / t_hot / 1e9,
           "torch_ms": t_torch * 1e3, "torch_GBps": kv_bytes / t_torch / 1e9}
    row["cpp_frac_read_bw"] = row["cpp_GBps"] / bw["read_GBps"]
    row["cpp_frac_memcpy_bw"] = row["cpp_GBps"] / bw["memcpy_GBps"]
    row["speedup"] = t_torch / t_cpp
    line = (f"{B:>3} {ctx:>5} {row['kv_MB']:>6.1f} | {row['cpp_ms']:>7.3f} "
            f"{row['cpp_GBps']:>5.1f} {100 * row['cpp_frac_read_bw']:>4.0f}% "
            f"{100 * row['cpp_frac_memcpy_bw']:>4.0f}% | {row['cpp_hot_GBps']:>8.1f} | "
            f"{row['torch_ms']:>8.2f} {row['torch_GBps']:>5.1f} | "
            f"{row['speedup']:>6.1f}x")
    if args.strategies:
        t_row = _time(lambda i: call(acpu.paged_decode_per_row, i), args.reps,
                      budget_s=args.budget)
        t_bat = _time(lambda i: call(acpu.paged_decode_batched, i), args.reps,
                      budget_s=args.budget)
        # Floor: the same attention over pre-gathered contiguous KV (flash call per row).
        ks = [acpu.gather_kv(kc, vc, tables[0][b], int(lens[b])) for b in range(B)]

        def nogather(i):
            for b in range(B):
                acpu.full_attention(q[b:b + 1], ks[b][0], ks[b][1], scale)
        t_ng = _time(nogather, args.reps, budget_s=args.budget)
        row.update(per_row_ms=t_row * 1e3, batched_ms=t_bat * 1e3, no_gather_ms=t_ng * 1e3)
        line += f" | {t_row * 1e3:>8.2f} {t_bat * 1e3:>8.2f} {t_ng * 1e3:>9.2f}"
    return row, line


def run_threads(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    bw = memory_bandwidth()
    print(f"\nthreads={torch.get_num_threads()} dtype={args.dtype} memory read "
          f"{bw['read_GBps']:.1f} GB/s, memcpy {bw['memcpy_GBps']:.1f} GB/s "
          f"(copy traffic {2 * bw['memcpy_GBps']:.1f} GB/s); kernel: {ops.build_info()}")
    Bs = [1, 32] if args.quick else [1, 32, 64]
    ctxs = [512, 2048] if args.quick else [512, 2048, 8192]
    dtype = getattr(torch, args.dtype)
    hdr = (f"{'B':>3} {'ctx':>5} {'KV MB':>6} | {'C++ ms':>7} {'GB/s':>5} {'%read':>5} "
           f"{'%mcpy':>5} | {'hot GB/s':>8} | {'torch ms':>8} {'GB/s':>5} | {'speedup':>7}")
    if args.strategies:
        hdr += f" | {'per-row':>8} {'batched':>8} {'no-gather':>9}"
    print(hdr)
    rows = []
    for B in Bs:
        for ctx in ctxs:
            row, line = measure_case(args, B, ctx, dtype, bw)
            rows.append(row)
            print(line, flush=True)
    return {"threads": torch.get_num_threads(), "bandwidth": bw, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid (smoke run)")
    p.add_argument("--mixed", action="store_true", help="row lengths uniform in [1, ctx]")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per torch measurement (default 3; quick 1)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--rotate-mb", type=float, default=None,
                   help="cold runs rotate over disjoint block sets totalling this many MB "
                        "(default 256; quick 64)")
    p.add_argument("--strategies", action="store_true",
                   help="also time the torch strategies (per-row, batched, no-gather)")
    p.add_argument("--out", default=None, help="write JSON results here")
    args = p.parse_args()
    if args.budget is None:
        args.budget = 1.0 if args.quick else 3.0
    if args.rotate_mb is None:
        args.rotate_mb = 64.0 if args.quick else 256.0
    if not ops.csrc_available():
        print(f"C++ kernels unavailable ({ops.load_error()}): the C++ columns time the torch "
              f"fallback", file=sys.stderr)
    res = {"runs": [run_threads(args, int(t)) for t in args.threads.split(",") if t]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
