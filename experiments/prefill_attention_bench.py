"""Micro-benchmark of CPU causal prefill attention: the C++ kernel vs torch's flash op.

Times `loong.ops.causal_attention` (csrc/cpu/prefill_attention.cpp) against
`loong.attention.cpu.causal_attention_torch` (aten._scaled_dot_product_flash_attention_for_cpu)
for L in {512, 1024, 2048, 4096}, SmolLM2 shapes (H=9, Hkv=3, D=64), bf16 (or --dtype), with 1
and 2 threads. q, k, v are views into a fused qkv buffer, as the engine passes them. Reports
the median of --reps runs (after a warm-up) as GFLOP/s, causal FLOPs = 4 * H * D * L * L / 2,
and the speed-up of the kernel over the flash op. With --full it also times the unmasked
variant (a chunk of L/4 queries against L keys, FLOPs 4 * H * D * Lq * Lk).

Usage: python experiments/prefill_attention_bench.py [--lengths 512,1024,2048,4096]
           [--threads 1,2] [--dtype bfloat16|float32] [--reps 7] [--full] [--quick]
           [--out experiments/results/prefill_attention_bench.json]
  --quick: lengths 512,1024 and 3 reps unless given (a smoke test, a few seconds).
Needs the C++ kernels (exits with an error without them).
Must not import: anything beyond torch, loong.ops and loong.attention.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loong import ops  # noqa: E402
from loong.attention import cpu as acpu  # noqa: E402

H, HKV, D = 9, 3, 64


def _median_time(fn, reps: int) -> float:
    fn()                                             # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _qkv(L: int, dtype: torch.dtype, Lk: int = None):
    Lk = L if Lk is None else Lk
    g = torch.Generator().manual_seed(L)
    if Lk == L:
        qkv = torch.randn(L, (H + 2 * HKV) * D, generator=g).to(dtype)
        q = qkv[:, :H * D].view(L, H, D)
        k = qkv[:, H * D:(H + HKV) * D].view(L, HKV, D)
        v = qkv[:, (H + HKV) * D:].view(L, HKV, D)
        return q, k, v
    q = torch.randn(L, H, D, generator=g).to(dtype)
    k = torch.randn(Lk, HKV, D, generator=g).to(dtype)
    v = torch.randn(Lk, HKV, D, generator=g).to(dtype)
    return q, k, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=None, help="default 512,1024,2048,4096 (quick 512,1024)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=None, help="default 7 (quick 3)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--quick", action="store_true", help="short lengths, 3 reps (smoke test)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.lengths is None:
        args.lengths = "512,1024" if args.quick else "512,1024,2048,4096"
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    dtype = getattr(torch, args.dtype)
    if not ops.csrc_available():
        sys.exit(f"C++ kernels unavailable: {ops.load_error()}")
    probe = torch.empty(1, 1, D, dtype=dtype)
    if not ops.prefill_kernel_supports(probe, probe, probe):
        sys.exit(f"prefill kernel does not run for {dtype} in this build ({ops.build_info()})")
    scale = D ** -0.5
    rows = []
    print(f"{ops.build_info()}; H={H} Hkv={HKV} D={D} {args.dtype}; median of {args.reps}")
    print(f"{'variant':8s} {'thr':>3s} {'Lq':>5s} {'Lk':>5s} {'flash ms':>9s} {'kern ms':>9s} "
          f"{'flash GF/s':>10s} {'kern GF/s':>10s} {'speedup':>7s}")
    old = torch.get_num_threads()
    try:
        for nt in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(nt)
            for L in [int(x) for x in args.lengths.split(",")]:
                cases = [("causal", L, L)]
                if args.full:
                    cases.append(("full", max(1, L // 4), L))
                for variant, Lq, Lk in cases:
                    q, k, v = _qkv(Lq, dtype, Lk)
                    if variant == "causal":
                        flops = 4.0 * H * D * L * L / 2
                        tf = _median_time(lambda: acpu.causal_attention_torch(q, k, v, scale),
                                          args.reps)
                        tk = _median_time(lambda: ops.causal_attention(q, k, v, scale),
                                          args.reps)
                    else:
                        flops = 4.0 * H * D * Lq * Lk
                        tf = _median_time(lambda: acpu.full_attention_torch(q, k, v, scale),
                                          args.reps)
                        tk = _median_time(lambda: ops.full_attention(q, k, v, scale),
                                          args.reps)
                    row = {"variant": variant, "threads": nt, "Lq": Lq, "Lk": Lk,
                           "dtype": args.dtype, "flash_s": tf, "kernel_s": tk,
                           "flash_gflops": flops / tf / 1e9, "kernel_gflops": flops / tk / 1e9,
                           "speedup": tf / tk}
                    rows.append(row)
                    print(f"{variant:8s} {nt:3d} {Lq:5d} {Lk:5d} {tf * 1e3:9.2f} {tk * 1e3:9.2f} "
                          f"{row['flash_gflops']:10.1f} {row['kernel_gflops']:10.1f} "
                          f"{row['speedup']:7.2f}")
    finally:
        torch.set_num_threads(old)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"build_info": ops.build_info(), "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
