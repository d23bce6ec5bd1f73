"""How much weight_dtype="q8_0" changes SmolLM2's outputs against bf16 (issue 18, item 3).

Two measurements on the same prompts (chat-templated instructions, fixed list below):
  teacher-forced  the bf16 model's greedy continuation (`--tokens` tokens) is fed to both
                  models; at every continuation position: max and mean |logit difference|
                  (also relative to the spread of the bf16 logits), KL(bf16 || q8) of the
                  next-token distributions, and how often both models' argmax agree.
  free-running    both models generate `--tokens` greedy tokens through `LLM`: how many
                  sequences are identical, and where the first differing token falls
                  (also for fp32 against bf16).
The same comparison of bf16 against fp32 (the model's dtype itself) is printed as a yardstick:
differences smaller than bf16's own from fp32 are below what the serving dtype already costs.

    python experiments/q8_accuracy.py              # 16 prompts x 64 tokens (~2 min)
    python experiments/q8_accuracy.py --quick      # 4 prompts x 16 tokens

Writes experiments/results/q8_accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to play the guitar.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What are the health benefits of drinking water?",
    "List the planets of the solar system in order.",
    "How do I make a cup of tea?",
    "What is the difference between a virus and a bacterium?",
    "Write a short story opening about a lighthouse keeper.",
    "What is 17 times 23? Show your work.",
    "Describe the water cycle.",
    "Suggest a name for a bakery and explain it.",
]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)


def build(loaded, dtype, q8: bool):
    from loong.model.llama import LlamaModel
    model = LlamaModel(loaded.config, dtype=dtype)
    model.load_hf_weights(loaded.weights)
    if q8:
        model.quantize_q8_0()
    return model


def sequence_logits(model, ids: list[int]):
    """fp32 logits [len(ids), V] of one whole sequence (causal attention, no cache)."""
    import torch
    from loong.attention.cpu import causal_attention
    scale = model.cfg.head_dim ** -0.5
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       lambda layer, q, k, v: causal_attention(q, k, v, scale)[0])
        return model.logits(hidden).float()


def compare(ref, other, start: int) -> dict:
    """Logit differences at positions start.. (those predicting continuation tokens)."""
    import torch
    a, b = ref[start - 1:-1], other[start - 1:-1]
    d = (a - b).abs()
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "logit_std": float(a.std(dim=-1).mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "positions": int(a.shape[0])}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, default=None, help="continuation tokens (default 64)")
    p.add_argument("--prompts", type=int, default=None, help="how many of the prompts (16)")
    p.add_argument("--json", default=os.path.join(RESULTS, "q8_accuracy.json"))
    a = p.parse_args(argv)
    n_tok = a.tokens or (16 if a.quick else 64)
    prompts = PROMPTS[:a.prompts or (4 if a.quick else len(PROMPTS))]

    import torch
    from loong import LLM, SamplingParams
    from loong.model.loader import load_model_files
    loaded = load_model_files(None)
    tok = loaded.tokenizer
    ids = [chat_ids(tok, t) for t in prompts]
    greedy = SamplingParams(max_tokens=n_tok, temperature=0.0, ignore_eos=True)

    gen = {}
    for key, dtype, wd in (("auto", "bfloat16", "auto"), ("q8_0", "bfloat16", "q8_0"),
                           ("fp32", "float32", "auto")):
        with LLM(loaded=loaded, dtype=dtype, weight_dtype=wd, enable_prefix_caching=False) as llm:
            gen[key] = [o.token_ids for o in llm.generate(ids, greedy)]
    free = {}
    for name, (x_key, y_key) in (("q8_0 vs bf16", ("auto", "q8_0")),
                                 ("bf16 vs fp32", ("fp32", "auto"))):
        same = sum(x == y for x, y in zip(gen[x_key], gen[y_key]))
        firsts = [first_difference(x, y) for x, y in zip(gen[x_key], gen[y_key])]
        diverged = [f for f in firsts if f is not None]
        free[name] = {"identical": same, "first_difference": firsts}
        print(f"free-running greedy, {name}, {len(prompts)} prompts x {n_tok} tokens: {same} "
              f"identical; first differing token at {sorted(diverged)} (median "
              f"{statistics.median(diverged) if diverged else '-'})", flush=True)

    models = {"bf16": build(loaded, torch.bfloat16, False),
              "q8_0": build(loaded, torch.bfloat16, True),
              "fp32": build(loaded, torch.float32, False)}
    rows = {"q8_0 vs bf16": [], "bf16 vs fp32": []}
    for prompt_ids, cont in zip(ids, gen["auto"]):
        seq = prompt_ids + cont
        logits = {k: sequence_logits(m, seq) for k, m in models.items()}
        rows["q8_0 vs bf16"].append(compare(logits["bf16"], logits["q8_0"], len(prompt_ids)))
        rows["bf16 vs fp32"].append(compare(logits["fp32"], logits["bf16"], len(prompt_ids)))
    summary = {}
    print(f"teacher-forced on the bf16 continuations ({sum(r['positions'] for r in rows['q8_0 vs bf16'])} "
          f"positions):")
    print(f"{'':<14}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'mean/std':>10}{'KL mean':>11}"
          f"{'KL max':>10}{'top-1 agree':>13}")
    for name, rs in rows.items():
        pos = sum(r["positions"] for r in rs)
        s = {"max_abs": max(r["max_abs"] for r in rs),
             "mean_abs": sum(r["mean_abs"] * r["positions"] for r in rs) / pos,
             "logit_std": statistics.mean(r["logit_std"] for r in rs),
             "kl_mean": sum(r["kl_mean"] * r["positions"] for r in rs) / pos,
             "kl_max": max(r["kl_max"] for r in rs),
             "top1_agree": sum(r["top1_agree"] * r["positions"] for r in rs) / pos}
        summary[name] = s
        print(f"{name:<14}{s['max_abs']:>14.3f}{s['mean_abs']:>15.4f}"
              f"{s['mean_abs'] / s['logit_std']:>10.4f}{s['kl_mean']:>11.2e}{s['kl_max']:>10.2e}"
              f"{s['top1_agree']:>13.2%}")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"prompts": len(prompts), "tokens": n_tok, "free_running": free,
                   "teacher_forced": summary,
                   "per_prompt": rows}, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
