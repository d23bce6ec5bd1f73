"""RL rollout batches in the simulator: makespan with FCFS vs the skewness-aware LTR order
(longest predicted output first, LPT dispatch), on a long-tailed output-length distribution.

The workload stands for GRPO-style rollouts: each step draws `--prompts` prompts and
`--samples` completions of each, all arriving at once; the step ends when its last sample
ends (the trainer waits for it: the "skewness bubble" is the instance time idle meanwhile).
Output lengths: each prompt has a typical length drawn from a real trace's output lengths
(Azure LLM inference 2023, conversation: `../shared/data/traces/azure_conv_2023.csv`,
`num_decode_tokens`; long-tailed: median ~120, p99 ~700), and each sample varies it by a
lognormal factor (sigma `--jitter`), as samples of one prompt do. The same prompts recur in
every step (RL epochs over a prompt set): the predictor learns each prompt's lengths from
the steps before (step 1 runs with nothing known, in arrival order).

For each policy and queue: mean makespan of steps 2..N, and the tail: the share of the step
after 90% of its samples ended (the long tail the trainer waits for). Prints LTR/FCFS.

    python experiments/rollout_sim.py --quick
    python experiments/rollout_sim.py            # 8 instances, 64 prompts x 8 samples, 4 steps

Writes experiments/results/rollout_sim.json.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402
from loong.sched.cost_model import load_cost_model  # noqa: E402
from loong.sched.policies.registry import build_policy  # noqa: E402
from loong.sched.queues import QueueDiscipline  # noqa: E402
from loong.sim.run import sim_policy_spec  # noqa: E402
from loong.sim.simulator import Simulator  # noqa: E402
from loong.sim.traces import default_data_dir  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")


@dataclass
class Sample:
    input_len: int
    output_len: int
    arrival_s: float | None = 0.0
    hash_ids: list[int] = field(default_factory=list)      # the prompt's identity


def trace_output_lengths(data_dir: str | None) -> list[int]:
    path = os.path.join(data_dir or default_data_dir() or "", "traces", "azure_conv_2023.csv")
    with open(path, newline="") as f:
        return [int(r["num_decode_tokens"]) for r in csv.DictReader(f)]


def prompt_set(a, lengths: list[int]) -> list[tuple[int, int]]:
    """(prompt length, typical output length) per prompt."""
    rng = random.Random(a.seed)
    return [(rng.randint(64, a.max_prompt_len), max(1, min(rng.choice(lengths), a.max_output)))
            for _ in range(a.prompts)]


def step_batch(a, prompts, step: int) -> list[Sample]:
    rng = random.Random(a.seed * 1000 + step)
    out = []
    for p, (plen, typical) in enumerate(prompts):
        for _ in range(a.samples):
            n = int(typical * rng.lognormvariate(0.0, a.jitter))
            out.append(Sample(plen, max(1, min(n, a.max_output)), 0.0, [p + 1]))
    return out


def run(a, policy: str, queue_kind: str, prompts, cost) -> list[dict]:
    blocks = cost.tokens_per_instance // a.block_size
    spec = sim_policy_spec(policy, a.instances, blocks, a.block_size, a.max_num_seqs,
                           "rollout", None, None, "least-loaded", "fcfs")
    queue = QueueDiscipline(queue_kind, cost)     # one predictor across the steps
    steps = []
    for step in range(a.steps):
        pol = build_policy(spec, cost)
        pol.queue = queue
        res = Simulator(pol, cost, a.instances, blocks, a.block_size,
                        token_content=True).run(step_batch(a, prompts, step))
        ends = sorted(r.finish_s for r in res.records)
        p90 = ends[int(0.9 * (len(ends) - 1))]
        steps.append({"makespan_s": res.end_s, "p90_finish_s": p90,
                      "tail_share": (res.end_s - p90) / res.end_s if res.end_s else 0.0,
                      "samples": len(res.records)})
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 instances, 8 prompts x 4, 3 steps")
    p.add_argument("--policies", default="chunked-prefill,elastic")
    p.add_argument("--instances", type=int, default=None, help="default 8 (quick 2)")
    p.add_argument("--prompts", type=int, default=None, help="default 64 (quick 8)")
    p.add_argument("--samples", type=int, default=None, help="per prompt; default 8 (quick 4)")
    p.add_argument("--steps", type=int, default=None, help="default 4 (quick 3)")
    p.add_argument("--jitter", type=float, default=0.3)
    p.add_argument("--max-output", type=int, default=2048)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default 32 (quick 4)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--preset", default="a800-lwm7b-tp2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=os.path.join(RESULTS, "rollout_sim.json"))
    a = p.parse_args(argv)
    q = a.quick
    a.instances = a.instances or (2 if q else 8)
    a.prompts = a.prompts or (8 if q else 64)
    a.samples = a.samples or (4 if q else 8)
    a.steps = a.steps or (3 if q else 4)
    a.max_num_seqs = a.max_num_seqs or (4 if q else 32)
    if a.steps < 2:
        p.error("--steps must be at least 2 (step 1 only teaches the predictor)")
    lengths = trace_output_lengths(a.data_dir)
    cost = load_cost_model(a.preset)
    prompts = prompt_set(a, lengths)
    typical = sorted(t for _, t in prompts)
    print(f"{a.prompts} prompts x {a.samples} samples on {a.instances} instances ({a.preset}); "
          f"typical outputs: median {statistics.median(typical):.0f}, max {typical[-1]} tokens "
          f"(Azure conv 2023), jitter sigma {a.jitter}; steps {a.steps}", flush=True)
    out = {"args": vars(a), "policies": {}}
    for policy in a.policies.split(","):
        res = {k: run(a, policy, k, prompts, cost) for k in ("fcfs", "ltr")}
        later = {k: statistics.mean(s["makespan_s"] for s in v[1:]) for k, v in res.items()}
        tail = {k: statistics.mean(s["tail_share"] for s in v[1:]) for k, v in res.items()}
        out["policies"][policy] = {"steps": res, "makespan_s": later, "tail_share": tail,
                                   "ltr_over_fcfs": later["ltr"] / later["fcfs"]}
        print(f"{policy}: makespan (steps 2..{a.steps}) FCFS {later['fcfs']:.2f} s, LTR "
              f"{later['ltr']:.2f} s: LTR/FCFS {later['ltr'] / later['fcfs']:.2f}x; the last 10% of "
              f"samples took {tail['fcfs']:.0%} -> {tail['ltr']:.0%} of the step (step 1, nothing known: "
              f"FCFS {res['fcfs'][0]['makespan_s']:.2f} s, LTR {res['ltr'][0]['makespan_s']:.2f} s)",
              flush=True)
    bc.write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
