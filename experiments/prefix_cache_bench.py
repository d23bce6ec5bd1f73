"""Prefix caching on real long documents, and n samples from one prompt (SmolLM2 bf16, CPU).

**L-Eval multi-question.** Real L-Eval documents with several of their own questions each
(`../shared/data/leval`; documents cut to `--doc-tokens`): per document, the first question
is sent alone, then the rest together. Reported: TTFT of the second and later questions
(mean) and total output throughput, with the prefix cache on and off, on 1 instance and on
2 instances whose KV is small enough that each document spans both. Goals: later-question
TTFT at least 5x lower with the cache, throughput at least 2x.

**n samples.** `--samples` completions of `--sample-tokens` tokens from one prompt of
`--sample-prompt` tokens, as one request with n (prompt computed once) against as many
separate requests with the cache off: prefill work (prompt tokens computed) and output
throughput.

Every configuration runs `--runs` times (median reported) in this process.

    python experiments/prefix_cache_bench.py --quick     # 2 documents x 3 questions, 1 run
    python experiments/prefix_cache_bench.py             # 6 documents x 4 questions, 3 runs

Writes experiments/results/prefix_cache.json.
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
LEVAL = os.path.join(ROOT, "..", "shared", "data", "leval")
FILES = ("coursera.jsonl", "tpo.jsonl", "quality.jsonl", "financial_qa.jsonl",
         "legal_contract_qa.jsonl", "scientific_qa.jsonl")


def documents(tok, n_docs: int, n_q: int, doc_tokens: int) -> list[tuple[list[int], list[list[int]]]]:
    """(document ids, [question ids]) from L-Eval (or a synthetic text without the data)."""
    out = []
    if os.path.isdir(LEVAL):
        for name in FILES:
            with open(os.path.join(LEVAL, name), encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    qs = [q for q in row["instructions"] if q.strip()][:n_q]
                    if len(qs) < n_q:
                        continue
                    doc = tok.encode(row["input"])[:doc_tokens]
                    out.append((doc, [tok.encode(f"\n\nQuestion: {q}\nAnswer:",
                                                 add_special_tokens=False) for q in qs]))
                    break
            if len(out) == n_docs:
                return out
    words = "the river runs past old stone towns where people trade grain and stories".split()
    while len(out) < n_docs:
        k = len(out)
        text = " ".join(words[(i * 7 + k) % len(words)] for i in range(doc_tokens))
        out.append((tok.encode(text)[:doc_tokens],
                    [tok.encode(f"\n\nQuestion {k}.{j}: what happened?\nAnswer:",
                                add_special_tokens=False) for j in range(n_q)]))
    return out


def run_questions(llm, docs, max_tokens: int) -> dict:
    from loong import SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    later_ttft, out_tokens, t0 = [], 0, time.perf_counter()
    for d, (doc, qs) in enumerate(docs):
        first = llm.generate(doc + qs[0], sp)[0]
        rest = llm.generate([doc + q for q in qs[1:]], sp)
        later_ttft += [o.ttft for o in rest]
        out_tokens += len(first.token_ids) + sum(len(o.token_ids) for o in rest)
    wall = time.perf_counter() - t0
    return {"later_ttft_s": statistics.mean(later_ttft), "output_tps": out_tokens / wall,
            "wall_s": wall, "cache": llm.engine.cache_stats()}


def run_samples(llm, prompt: list[int], n: int, tokens: int, as_one: bool) -> dict:
    from loong import SamplingParams
    sp = dict(max_tokens=tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
    before = llm.engine.stats["prefill_tokens"]
    t0 = time.perf_counter()
    if as_one:
        outs = llm.generate(prompt, SamplingParams(n=n, seed=1, **sp))[0].outputs
    else:
        outs = llm.generate([prompt] * n, [SamplingParams(seed=i, **sp) for i in range(n)])
    wall = time.perf_counter() - t0
    return {"prefill_tokens": llm.engine.stats["prefill_tokens"] - before,
            "output_tps": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall}


def median_of(runs: list[dict]) -> dict:
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs"] = runs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 documents x 3 questions, 1 run")
    p.add_argument("--docs", type=int, default=None, help="documents (default 6, quick 2)")
    p.add_argument("--questions", type=int, default=None, help="per document (default 4, quick 3)")
    p.add_argument("--doc-tokens", type=int, default=None, help="default 3000 (quick 600)")
    p.add_argument("--max-tokens", type=int, default=None, help="per answer (default 16, quick 4)")
    p.add_argument("--runs", type=int, default=None, help="default 3 (quick 1)")
    p.add_argument("--instances", default="1,2")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=None, help="default 128 (quick 8)")
    p.add_argument("--sample-prompt", type=int, default=None, help="default 1024 (quick 128)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=os.path.join(RESULTS, "prefix_cache.json"))
    a = p.parse_args(argv)
    q = a.quick
    n_docs, n_q = a.docs or (2 if q else 6), a.questions or (3 if q else 4)
    doc_tokens, max_tokens = a.doc_tokens or (600 if q else 3000), a.max_tokens or (4 if q else 16)
    runs = a.runs or (1 if q else 3)
    from loong import LLM
    from loong.model.loader import load_model_files
    loaded = load_model_files(None)
    docs = documents(loaded.tokenizer, n_docs, n_q, doc_tokens)
    res: dict = {"docs": n_docs, "questions": n_q, "doc_tokens": [len(d) for d, _ in docs],
                 "max_tokens": max_tokens, "questions_table": {}, "samples": {}}
    print(f"L-Eval multi-question: {n_docs} documents of {[len(d) for d, _ in docs]} tokens, "
          f"{n_q} questions each, {max_tokens} output tokens, median of {runs} run(s)")
    print(f"{'instances':>9} {'cache':>5} {'later-question TTFT ms':>23} {'output tok/s':>13} "
          f"{'hit rate':>8}")
    for n in (int(x) for x in a.instances.split(",")):
        # Each instance holds a bit over half a document on 2 instances: documents span both.
        kv = None if n == 1 else (doc_tokens + 400) // n + 64
        row = {}
        for cache in (False, True):
            measured = []
            for _ in range(runs):
                with LLM(loaded=loaded, dtype=a.dtype, instances=n, kv_capacity_tokens=kv,
                         enable_prefix_caching=cache) as llm:
                    run_questions(llm, docs[:1], 1)                    # warm-up
                    llm.engine.policy.clear_cache()
                    llm.engine.flush()
                    measured.append(run_questions(llm, docs, max_tokens))
            m = median_of(measured)
            row["on" if cache else "off"] = m
            hit = measured[-1]["cache"]["hit_rate"]
            print(f"{n:>9} {'on' if cache else 'off':>5} {m['later_ttft_s'] * 1e3:>23.1f} "
                  f"{m['output_tps']:>13.1f} {hit:>8.2f}", flush=True)
        row["ttft_ratio"] = row["off"]["later_ttft_s"] / row["on"]["later_ttft_s"]
        row["throughput_ratio"] = row["on"]["output_tps"] / row["off"]["output_tps"]
        print(f"{n} instance(s): later-question TTFT {row['ttft_ratio']:.1f}x lower, "
              f"throughput {row['throughput_ratio']:.2f}x (goals 5x and 2x)", flush=True)
        res["questions_table"][str(n)] = row
    sp_len, sp_tok = a.sample_prompt or (128 if q else 1024), a.sample_tokens or (8 if q else 128)
    prompt = [(1000 + 37 * i) % 40000 + 100 for i in range(sp_len)]
    for as_one in (False, True):
        measured = []
        for _ in range(runs):
            with LLM(loaded=loaded, dtype=a.dtype, enable_prefix_caching=as_one) as llm:
                measured.append(run_samples(llm, prompt, a.samples, sp_tok, as_one))
        res["samples"]["n" if as_one else "separate"] = median_of(measured)
    s, o = res["samples"]["separate"], res["samples"]["n"]
    print(f"n samples: {a.samples} x {sp_tok} tokens from a {sp_len}-token prompt: prefill "
          f"tokens {o['prefill_tokens']:.0f} vs {s['prefill_tokens']:.0f} separate "
          f"({s['prefill_tokens'] / max(1, o['prefill_tokens']):.1f}x less); output "
          f"{o['output_tps']:.1f} vs {s['output_tps']:.1f} tok/s "
          f"({o['output_tps'] / s['output_tps']:.2f}x)")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
