"""Cost of the protobuf control protocol per step, against pickling the same dataclasses.

    python experiments/control_codec_bench.py [--repeats 7] [--quick]

--quick: 3 repeats (a smoke test, about a second).

Messages: a decode step of B requests (each with shards on 2 instances) and its result,
and a ring-prefill step of one P-token prompt over 4 instances. For each: encode+decode
time (median of repeats) and frame size, protobuf vs pickle (the previous wire form), and
the ratio. Step compute on this host is tens of milliseconds, so what matters is that the
codec stays well under a millisecond at decode sizes.
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from loong.sampling_params import SamplingParams  # noqa: E402
from loong.sched.cluster_plan import (ClusterStepPlan, DecodeGroupPlan, DecodeItem,  # noqa: E402
                                      InstanceCounters, KeepRange, PrefillGroupPlan, PrefillItem)
from loong.cluster.control_codec import decode, encode  # noqa: E402
from loong.worker.step_io import InstanceResult, InstanceStep, RequestSync  # noqa: E402


def decode_step(batch: int) -> InstanceStep:
    items = tuple(DecodeItem(f"req-{i}", 1000 + i, 4096 + i, i % 2, ((0, 2048), (1, 2048 + i)))
                  for i in range(batch))
    syncs = tuple(RequestSync(f"req-{i}", None, None, (1000 + i,)) for i in range(batch))
    return InstanceStep(ClusterStepPlan(7, decodes=(DecodeGroupPlan((0, 1), items),)), syncs)


def decode_result(batch: int) -> InstanceResult:
    return InstanceResult(0, 7, sampled={f"req-{i}": i for i in range(batch)},
                          shard_tokens={f"req-{i}": 2049 + i for i in range(batch)},
                          free_blocks=1000, counters=InstanceCounters(1, 2, 3, 0.1, 0.2, 0))


def prefill_step(tokens: int) -> InstanceStep:
    n = 4
    keep = tuple(KeepRange(i, i * tokens // n, (i + 1) * tokens // n) for i in range(n))
    plan = ClusterStepPlan(3, prefills=(PrefillGroupPlan(tuple(range(n)), (
        PrefillItem("long", tuple(range(tokens)), keep),)),))
    return InstanceStep(plan, (RequestSync("long", SamplingParams(max_tokens=100),
                                           tuple(range(tokens)), ()),))


def timed(fn, repeats: int, inner: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="default 7 (quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 repeats (smoke test)")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    cases = [(f"decode step, batch {b}", decode_step(b)) for b in (1, 32, 256)]
    cases += [(f"decode result, batch {b}", decode_result(b)) for b in (32, 256)]
    cases += [(f"prefill step, {p} tokens", prefill_step(p)) for p in (8192, 131072)]
    print(f"{'message':28s} {'proto us':>10s} {'pickle us':>10s} {'ratio':>6s} "
          f"{'proto B':>9s} {'pickle B':>9s}")
    for name, msg in cases:
        assert decode(encode(msg)) == msg
        inner = 3 if "131072" in name else 50
        t_pb = timed(lambda: decode(encode(msg)), args.repeats, inner)
        t_pk = timed(lambda: pickle.loads(pickle.dumps(msg)), args.repeats, inner)
        print(f"{name:28s} {t_pb * 1e6:10.1f} {t_pk * 1e6:10.1f} {t_pb / t_pk:6.2f} "
              f"{len(encode(msg)):9d} {len(pickle.dumps(msg)):9d}")


if __name__ == "__main__":
    main()
