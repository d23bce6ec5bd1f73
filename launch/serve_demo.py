"""Send a running Loong server real requests and print what it did (the README's main job).

    python launch/serve_demo.py --address 127.0.0.1:50051 --http-url http://127.0.0.1:8000

Streams three chat answers concurrently over gRPC, asks one question over the
OpenAI-compatible HTTP API, then a question about a long document: an L-Eval document
where ../shared/data/leval is present, else Loong's own design notes (loong/ARCHITECTURE.md,
shipped in the package), about 3,000 tokens, which the server's KV per instance is sized
not to hold alone, so its prefill runs with ring attention over the instances; prints each
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


def document(use_leval: bool) -> tuple[str, str, str]:
    """(what it is, text, question): an L-Eval document when present, else Loong's own
    design notes."""
    if use_leval and os.path.exists(LEVAL):
        with open(LEVAL, encoding="utf-8") as f:
            doc = json.loads(f.readline())
        return "an L-Eval Coursera transcript", doc["input"], doc["instructions"][0]
    import loong
    with open(os.path.join(os.path.dirname(loong.__file__), "ARCHITECTURE.md"),
              encoding="utf-8") as f:
        return ("Loong's design notes (loong/ARCHITECTURE.md)", f.read(),
                "What does the manager decide for each request?")


async def long_document(client, max_chars: int, use_leval: bool) -> None:
    what, text, question = document(use_leval)
    prompt = text[:max_chars] + "\n\nQuestion: " + question + "\nAnswer:"
    before = (await client.stats())["group_sizes"]
    r = await client.generate(prompt=prompt, max_tokens=48, temperature=0.0)
    after = (await client.stats())["group_sizes"]
    spread = max((int(k) for k, v in after.items() if v > before.get(k, 0)), default=1)
    print(f"--- long document ({r.prompt_tokens} tokens of {what}; prefilled with ring "
          f"attention over {spread} instance(s))\nQ: {question}\nA: {r.text.strip()}\n"
          f"[TTFT {r.timing['ttft_s']:.2f} s, {r.completion_tokens} tokens, "
          f"finish_reason={r.finish_reason}]", flush=True)


def http_chat(url: str, question: str, max_tokens: int) -> None:
    """One request over the OpenAI-compatible API (what `curl` or `openai` would send)."""
    import time
    import urllib.request
    body = json.dumps({"messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    u = answer["usage"]
    print(f"--- [HTTP] POST {url}/v1/chat/completions: {question}\n"
          f"{answer['choices'][0]['message']['content'].strip()}\n[finish_reason="
          f"{answer['choices'][0]['finish_reason']}, {u['prompt_tokens']} prompt + "
          f"{u['completion_tokens']} output tokens, {time.perf_counter() - t0:.2f} s]", flush=True)


async def main_async(args) -> int:
    from loong.client import AsyncLoongClient
    async with AsyncLoongClient(args.address, timeout=args.timeout) as client:
        await client.wait_ready(args.wait)
        info = await client.model_info()
        print(f"server: {info['model']} on {info['instances']} instance(s), {info['policy']} "
              f"policy, {info['kv_tokens_per_instance']} KV tokens per instance", flush=True)
        await asyncio.gather(*(chat(client, i, q, args.max_tokens) for i, q in enumerate(CHATS)))
        if args.http_url:
            await asyncio.to_thread(http_chat, args.http_url, "Name three long rivers.",
                                    args.max_tokens)
        await long_document(client, args.max_doc_chars, not args.no_leval)
        st = await client.stats()
    print(f"\nserver stats: {st['finished']} requests, {st['prompt_tokens']} prompt and "
          f"{st['completion_tokens']} output tokens in {st['steps']} steps; prefill group "
          f"sizes {st['group_sizes']} (size: steps)")
    for g in st["instances"]:
        print(f"  instance {g['rank']}: {g['blocks_used']} KV blocks used, "
              f"{g['blocks_cached']} cached, {g['blocks_free']} free")
    if args.http_url:
        print(f"\nlive console: {args.http_url}/ (open it in a browser while requests run)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the server")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-call deadline (s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--http-url", default=None,
                    help="the server's HTTP API (e.g. http://127.0.0.1:8000): one request over it")
    ap.add_argument("--max-doc-chars", type=int, default=12000,
                    help="characters of the long document to send (about 4 per token)")
    ap.add_argument("--no-leval", action="store_true",
                    help="use Loong's design notes even where L-Eval documents are present")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
