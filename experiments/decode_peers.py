"""Decode latency of a peer engine (vLLM's CPU build or llama.cpp), run in that engine's own
virtual environment by `decode_latency.py`: standard library plus the engine only.

Workloads are timed by difference (vLLM, Loong): the time to generate `n` tokens minus the
time to generate 1 token from the same prompts, over `n - 1`, is the time of one decode step
(prefill cancels out); llama.cpp streams, and its step is the time from the first streamed
token to the last over the tokens between (its long-prompt prefill is too noisy to subtract). Greedy, end-of-sequence ignored. Prints one JSON
object: {"engine", "version", "batch1": {context: [step seconds per run]},
"batched": {batch: [step seconds per run]}}.

    python decode_peers.py --engine vllm --model HF_DIR --contexts 64,2048 --batches 32,64
    python decode_peers.py --engine llamacpp --model FILE.gguf --contexts 64,2048
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def prompt_ids(n: int, vocab: int, salt: int = 0) -> list[int]:
    return [(1000 + 37 * i + 101 * salt) % vocab for i in range(n)]


class VllmRunner:
    def __init__(self, model: str, threads: int, max_len: int) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        import vllm
        self.version = vllm.__version__
        self.llm = vllm.LLM(model=model, dtype="bfloat16", max_model_len=max_len,
                            enable_prefix_caching=False, seed=0)
        self.vocab = self.llm.get_tokenizer().vocab_size
        self.sp = vllm.SamplingParams

    def timed(self, prompts: list[list[int]], n: int) -> float:
        sp = self.sp(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0


class LlamaCppRunner:
    def __init__(self, model: str, threads: int, max_len: int) -> None:
        import llama_cpp
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=max_len, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.eos = self.llm.token_eos()

    def tpot(self, prompt: list[int], n: int) -> float:
        """Seconds between streamed tokens (first to last): the difference method drowns in
        the noise of a long prompt's prefill here."""
        self.llm.reset()                       # no reuse of the previous call's prompt
        stamps = [time.perf_counter() for _ in self.llm.create_completion(
            prompt, max_tokens=n, temperature=0.0, logit_bias={self.eos: -1e9}, stream=True)]
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def step_times(runner, prompts: list[list[int]], n: int, runs: int) -> list[float]:
    if hasattr(runner, "tpot"):                # a streaming engine, one stream
        if len(prompts) != 1:
            raise ValueError("streamed timing runs one stream")
        runner.tpot(prompts[0], 4)
        return [runner.tpot(prompts[0], n) for _ in range(runs)]
    runner.timed(prompts, 4)                   # warm-up
    out = []
    for _ in range(runs):
        one = runner.timed(prompts, 1)
        many = runner.timed(prompts, n)
        out.append(max(many - one, 0.0) / (n - 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["vllm", "llamacpp"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--contexts", default="64,2048")
    p.add_argument("--batches", default="", help="batched workloads (vLLM only)")
    p.add_argument("--batch-prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]
    max_len = max(contexts + [a.batch_prompt_len]) + a.output_len + 16
    runner = (VllmRunner if a.engine == "vllm" else LlamaCppRunner)(a.model, a.threads, max_len)
    res = {"engine": a.engine, "version": runner.version, "batch1": {}, "batched": {}}
    for c in contexts:
        res["batch1"][str(c)] = step_times(runner, [prompt_ids(c, runner.vocab)], a.output_len,
                                           a.runs)
    for b in batches:
        prompts = [prompt_ids(a.batch_prompt_len, runner.vocab, s) for s in range(b)]
        res["batched"][str(b)] = step_times(runner, prompts, a.output_len, a.runs)
    print("PEER_RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
