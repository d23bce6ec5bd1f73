"""Send a running Loong server real requests and print what it did (the README's main job).

    python launch/serve_demo.py --address 127.0.0.1:50051

Streams three chat answers concurrently, then, where ../shared/data/leval is present, a
question about a long L-Eval document (its prefill spans the instances); prints each
answer with its timing, then the server's stats: prefill group sizes, KV blocks per
instance, requests and tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LEVAL = os.path.join(HERE, "..", "..", "shared", "data", "leval", "coursera.jsonl")
CHATS = ["What is the capital of France? Answer in one sentence.",
         "Give me three tips for reading long documents.",
         "Write a short poem about the sea."]


async def chat(client, i: int, question: str, max_tokens: int) -> None:
    text = []
    async for msg in client.generate_stream(messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0.0):
        text.append(msg.text)
        if msg.finish_reason:
            t = msg.timing
            print(f"--- [{i}] {question}\n{''.join(text).strip()}\n[finish_reason="
                  f"{msg.finish_reason}, {msg.usage.prompt_tokens} prompt + "
                  f"{msg.usage.completion_tokens} output tokens, TTFT {t.ttft_s * 1e3:.0f} ms, "
                  f"{t.decode_s * 1e3 / max(1, msg.usage.completion_tokens - 1):.0f} ms/token]",
                  flush=True)


async def long_document(client, max_chars: int) -> None:
    if not os.path.exists(LEVAL):
        print("(no ../shared/data/leval: skipping the long-document request)")
        return
    with open(LEVAL, encoding="utf-8") as f:
        doc = json.loads(f.readline())
    question = doc["instructions"][0]
    prompt = doc["input"][:max_chars] + "\n\nQuestion: " + question + "\nAnswer:"
    r = await client.generate(prompt=prompt, max_tokens=48, temperature=0.0)
    print(f"--- long document ({r.prompt_tokens} tokens of an L-Eval Coursera transcript)\n"
          f"Q: {question}\nA: {r.text.strip()}\n[TTFT {r.timing['ttft_s']:.2f} s, "
          f"{r.completion_tokens} tokens, finish_reason={r.finish_reason}]", flush=True)


async def main_async(args) -> int:
    from loong.client import AsyncLoongClient
    async with AsyncLoongClient(args.address, timeout=args.timeout) as client:
        await client.wait_ready(args.wait)
        info = await client.model_info()
        print(f"server: {info['model']} on {info['instances']} instance(s), {info['policy']} "
              f"policy, {info['kv_tokens_per_instance']} KV tokens per instance", flush=True)
        await asyncio.gather(*(chat(client, i, q, args.max_tokens) for i, q in enumerate(CHATS)))
        await long_document(client, args.max_doc_chars)
        st = await client.stats()
    print(f"\nserver stats: {st['finished']} requests, {st['prompt_tokens']} prompt and "
          f"{st['completion_tokens']} output tokens in {st['steps']} steps; prefill group "
          f"sizes {st['group_sizes']} (size: steps)")
    for g in st["instances"]:
        print(f"  instance {g['rank']}: {g['blocks_used']} KV blocks used, {g['blocks_free']} free")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the server")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-call deadline (s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-doc-chars", type=int, default=16000,
                    help="characters of the long document to send (about 4 per token)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
