"""A small GRPO run with Loong as the rollout engine, disaggregated: the trainer (this
process, plain PyTorch, `policy_model.TrainLlama`) fine-tunes the embedded SmolLM2-135M on
single-digit addition ("Q: What is 3 + 5?\nA: The answer is" -> reward 1 when the first
number of the answer is the sum), while a `loong serve` process generates the samples; after
every step the trainer pushes the changed weights to the server over a torch.distributed
group (`loong.weight_sync.WeightSender`, the server's `UpdateWeightsFromDistributed`).

Two modes, in the same run, on fresh weights each:
  sync      generate the whole batch, then train on it, then push (each side waits for the
            other);
  streamed  StreamRL-style: a rollout thread generates the next batch while the trainer
            trains on the current one (one step off-policy: a batch starts on the weights
            of the step before and picks up each push as it lands); the trainer takes each
            prompt's group of samples as soon as it ends (gradients accumulate group by
            group) instead of waiting for the whole batch.
GRPO: per prompt, G samples; advantage = (reward - group mean) / (group std + 1e-4); the
PPO-clipped objective with the engine's raw logprobs of the sampled tokens as the old policy
(so the one-step-off-policy batches are corrected). No KL term, no value head.

Prints per step: mean reward, mean response length; per mode: samples/s and the share of
wall time the trainer and the generator were idle. Writes experiments/results/rl/grpo.json
and grpo.png (reward and response length per step, both modes; needs matplotlib).

    python experiments/rl/grpo.py --quick      # 3 steps per mode (smoke test)
    python experiments/rl/grpo.py              # 20 steps per mode, 8 prompts x 8 samples
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import random
import re
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from loong.client import LoongClient  # noqa: E402
from loong.model.loader import load_model_files  # noqa: E402
from loong.tools.server_process import ServerProcess  # noqa: E402
from loong.weight_sync import WeightSender  # noqa: E402
from policy_model import TrainLlama  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results", "rl")
PROMPT = "Q: What is {a} + {b}?\nA: The answer is"


# ----- task --------------------------------------------------------------------------------
def problems(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]


def reward(text: str, a: int, b: int) -> float:
    m = re.search(r"-?\d+", text)
    return 1.0 if m is not None and int(m.group()) == a + b else 0.0


# ----- rollout (the client side of the Loong server) --------------------------------------
class Rollout:
    def __init__(self, client: LoongClient, tokenizer, a) -> None:
        self.client, self.tok, self.a = client, tokenizer, a
        self.pool = concurrent.futures.ThreadPoolExecutor(a.prompts)

    def group(self, a_: int, b_: int, seed: int) -> dict:
        """One prompt's G samples: token ids, engine logprobs, rewards."""
        ids = self.tok.encode(PROMPT.format(a=a_, b=b_))
        res = self.client.generate(prompt_token_ids=ids, n=self.a.samples, temperature=1.0,
                                   max_tokens=self.a.max_tokens, logprobs=0, seed=seed)
        comps = res.completions or [res]
        return {"prompt": ids, "a": a_, "b": b_, "versions": [c.weight_version for c in comps],
                "samples": [(list(c.token_ids), [lp for lp, _ in (c.logprobs or [])],
                             reward(c.text, a_, b_)) for c in comps]}

    def batch(self, probs, seed: int):
        """Futures of one group per problem (they end in any order)."""
        return [self.pool.submit(self.group, x, y, seed * 1000 + i)
                for i, (x, y) in enumerate(probs)]


# ----- trainer -----------------------------------------------------------------------------
class Trainer:
    def __init__(self, loaded, a) -> None:
        torch.manual_seed(a.seed)
        self.model = TrainLlama(loaded)
        self.model.trainable(a.train_layers)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        self.a = a

    def accumulate(self, group: dict, groups_per_step: int) -> bool:
        """Add one group's GRPO loss gradient; False when its rewards are all equal (no
        signal)."""
        rewards = torch.tensor([r for _, _, r in group["samples"]])
        if float(rewards.std()) < 1e-6:
            return False
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        prompt = group["prompt"]
        rows = [prompt + toks for toks, _, _ in group["samples"] if toks]
        keep = [i for i, (toks, _, _) in enumerate(group["samples"]) if toks]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lens = [len(group["samples"][i][0]) for i in keep]
        new = self.model.token_logprobs(ids, [len(prompt)] * len(rows), lens)
        eps = self.a.clip
        loss = 0.0
        for j, i in enumerate(keep):
            old = torch.tensor(group["samples"][i][1][:lens[j]])
            ratio = (new[j] - old).exp()
            obj = torch.minimum(ratio * adv[i], ratio.clamp(1 - eps, 1 + eps) * adv[i])
            loss = loss - obj.mean() / len(keep)
        (loss / groups_per_step).backward()
        return True

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def push(sender: WeightSender, client: LoongClient, trainer: Trainer) -> int:
    named = list(trainer.model.named_trainable())
    names, dtypes, shapes = WeightSender.describe(named)
    t = threading.Thread(target=sender.broadcast, args=(named,), daemon=True)
    t.start()
    version = client.update_weights_from_distributed(names, dtypes, shapes)
    t.join()
    return version


def step_stats(groups: list[dict]) -> tuple[float, float]:
    samples = [s for g in groups for s in g["samples"]]
    return (statistics.mean(r for _, _, r in samples),
            statistics.mean(len(t) for t, _, _ in samples))


# ----- the two modes -----------------------------------------------------------------------
def run_sync(a, rollout, trainer, sender, client) -> dict:
    rng = random.Random(a.seed)
    steps, gen_s, train_s, t_start = [], 0.0, 0.0, time.perf_counter()
    for k in range(a.steps):
        t0 = time.perf_counter()
        groups = [f.result() for f in rollout.batch(problems(rng, a.prompts), k)]
        t1 = time.perf_counter()
        used = sum(trainer.accumulate(g, len(groups)) for g in groups)
        if used:
            trainer.step()
        version = push(sender, client, trainer)
        t2 = time.perf_counter()
        gen_s, train_s = gen_s + (t1 - t0), train_s + (t2 - t1)
        r, n = step_stats(groups)
        steps.append({"step": k, "reward": r, "length": n, "groups_used": used,
                      "weight_version": version})
        print(f"  sync step {k}: reward {r:.2f}, length {n:.1f} ({t1 - t0:.1f} s generating, "
              f"{t2 - t1:.1f} s training + push)", flush=True)
    wall = time.perf_counter() - t_start
    return {"steps": steps, "wall_s": wall, "samples_per_s": a.steps * a.prompts * a.samples / wall,
            "trainer_idle": gen_s / wall, "generator_idle": train_s / wall}


def run_streamed(a, rollout, trainer, sender, client) -> dict:
    rng = random.Random(a.seed)
    ready: queue.Queue = queue.Queue()
    gen_busy = [0.0]
    ahead = threading.Semaphore(2)        # batches in flight: this one and the next

    def producer():
        for k in range(a.steps):
            ahead.acquire()
            t0 = time.perf_counter()
            futures = rollout.batch(problems(rng, a.prompts), k)
            for f in concurrent.futures.as_completed(futures):
                ready.put((k, f.result()))
            gen_busy[0] += time.perf_counter() - t0

    th = threading.Thread(target=producer, daemon=True)
    t_start = time.perf_counter()
    th.start()
    steps, waited = [], 0.0
    for k in range(a.steps):
        groups, used = [], 0
        while len(groups) < a.prompts:
            t0 = time.perf_counter()
            kk, g = ready.get()
            waited += time.perf_counter() - t0
            assert kk == k
            groups.append(g)
            used += trainer.accumulate(g, a.prompts)      # train on it as soon as it ends
        ahead.release()
        if used:
            trainer.step()
        version = push(sender, client, trainer)
        r, n = step_stats(groups)
        off = statistics.mean(v for g in groups for v in g["versions"])
        steps.append({"step": k, "reward": r, "length": n, "groups_used": used,
                      "weight_version": version, "mean_sample_version": off})
        print(f"  streamed step {k}: reward {r:.2f}, length {n:.1f} (samples finished on "
              f"weight version {off:.2f}, pushed {version})", flush=True)
    th.join()
    wall = time.perf_counter() - t_start
    return {"steps": steps, "wall_s": wall, "samples_per_s": a.steps * a.prompts * a.samples / wall,
            "trainer_idle": waited / wall, "generator_idle": 1 - gen_busy[0] / wall}


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", flush=True)
        return False
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for mode, res in results.items():
        xs = [s["step"] for s in res["steps"]]
        ax[0].plot(xs, [s["reward"] for s in res["steps"]], marker="o", label=mode)
        ax[1].plot(xs, [s["length"] for s in res["steps"]], marker="o", label=mode)
    ax[0].set(title="mean reward per step", xlabel="step", ylabel="reward (accuracy)")
    ax[1].set(title="mean response length", xlabel="step", ylabel="tokens")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend()
    fig.suptitle("GRPO on SmolLM2-135M with Loong as the rollout engine (single-digit addition)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps per mode, 4 prompts x 4")
    p.add_argument("--steps", type=int, default=None, help="per mode; default 20 (quick 3)")
    p.add_argument("--prompts", type=int, default=None, help="per step; default 8 (quick 4)")
    p.add_argument("--samples", type=int, default=None, help="per prompt; default 8 (quick 4)")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--train-layers", type=int, default=6, help="last layers trained")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--modes", default="sync,streamed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.quick else 20)
    a.prompts = a.prompts or (4 if a.quick else 8)
    a.samples = a.samples or (4 if a.quick else 8)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)                  # one core for the trainer, one for Loong
    loaded = load_model_files(None)
    results = {}
    for mode in a.modes.split(","):
        print(f"{mode}: starting a 1-instance Loong server and a fresh trainer", flush=True)
        srv = ServerProcess(["--instances", "1", "--dtype", "auto", "--no-prefix-caching"],
                            {"OMP_NUM_THREADS": "1"}, cwd=ROOT)
        try:
            with LoongClient(srv.address, timeout=600) as client:
                client.wait_ready(120)
                trainer = Trainer(loaded, a)
                port = ServerProcess.free_port()
                box: dict = {}
                t = threading.Thread(target=lambda: box.setdefault(
                    "s", WeightSender("127.0.0.1", port, 2, timeout_s=120)), daemon=True)
                t.start()
                client.init_weight_update_group("127.0.0.1", port, 2, timeout_s=120)
                t.join(120)
                sender = box["s"]
                rollout = Rollout(client, loaded.tokenizer, a)
                fn = run_sync if mode == "sync" else run_streamed
                results[mode] = fn(a, rollout, trainer, sender, client)
        finally:
            srv.stop()
        r = results[mode]
        print(f"{mode}: {r['samples_per_s']:.2f} samples/s, trainer idle {r['trainer_idle']:.0%}, "
              f"generator idle {r['generator_idle']:.0%}; reward {r['steps'][0]['reward']:.2f} -> "
              f"{r['steps'][-1]['reward']:.2f}", flush=True)
    if "sync" in results and "streamed" in results:
        ratio = results["streamed"]["samples_per_s"] / results["sync"]["samples_per_s"]
        print(f"streamed / sync throughput: {ratio:.2f}x", flush=True)
        results["streamed_over_sync"] = ratio
    with open(os.path.join(a.out, "grpo.json"), "w") as f:
        json.dump({"args": vars(a), "results": results}, f, indent=1)
    plot({m: r for m, r in results.items() if isinstance(r, dict)},
         os.path.join(a.out, "grpo.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
