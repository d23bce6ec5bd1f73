"""`loong client ...`: command-line access to a running Loong gRPC server.

`loong client generate --prompt TEXT` streams the text to stdout as it arrives and prints
a one-line summary to stderr (`--json` prints the whole GenerateResult as one JSON object
instead); `loong client info|stats` print JSON; `loong client health` prints the status
and exits 0 only when SERVING; `loong client abort REQUEST_ID` exits 0 when the request
was in flight. RPC errors print "loong client: error: CODE: details" to stderr and exit 1
(2 for INVALID_ARGUMENT). The API key defaults to $LOONG_API_KEY. No torch needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from loong.client import GenerateResult, LoongClient, LoongClientError, collect

ENV_API_KEY = "LOONG_API_KEY"


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    g.add_argument("--api-key", default=None, help=f"API key (default: ${ENV_API_KEY})")
    g.add_argument("--tls-ca", default=None, metavar="PATH",
                   help="PEM root certificates; connect with TLS (default: plaintext)")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--chat", metavar="TEXT", help="one user message, rendered with the chat template")
    src.add_argument("--token-ids", type=_token_ids, metavar="IDS", help='prompt token ids, "1,2,3"')
    p.add_argument("--request-id", default="", help="request id (default: server-assigned)")
    g = p.add_argument_group("sampling (options not given take the server's defaults)")
    g.add_argument("--max-tokens", type=int, default=64, help="default 64")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, metavar="N", help="top-N logprobs per token")
    p.add_argument("--timeout-s", type=float, default=0.0,
                   help="server-side time limit; the request ends with finish_reason timeout")
    p.add_argument("--no-stream", action="store_true", help="print the text once, when done")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON object")


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `client` sub-command (generate, info, stats, health, abort) to `subparsers`."""
    client = subparsers.add_parser("client", help="talk to a running Loong gRPC server")
    sub = client.add_subparsers(dest="client_command", required=True)
    gen = sub.add_parser("generate", help="generate text (streams to stdout)")
    _add_generate_args(gen)
    sub.add_parser("info", help="print the model info as JSON")
    sub.add_parser("stats", help="print the server stats as JSON")
    sub.add_parser("health", help="print the health status; exit 0 only when SERVING")
    ab = sub.add_parser("abort", help="abort a request in flight; exit 0 when it was found")
    ab.add_argument("request_id", metavar="REQUEST_ID")
    for p in sub.choices.values():
        _add_connection_args(p)
    return client


def _connect(args) -> LoongClient:
    certs = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            certs = f.read()
    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY)
    return LoongClient(args.address, api_key=api_key or None, tls_root_certificates=certs)


def _request_kwargs(args) -> dict:
    kw = dict(request_id=args.request_id, timeout_s=args.timeout_s, max_tokens=args.max_tokens,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
              seed=args.seed, stop=args.stop, logprobs=args.logprobs)
    if args.ignore_eos:
        kw["ignore_eos"] = True
    if args.chat is not None:
        kw["messages"] = [{"role": "user", "content": args.chat}]
    elif args.token_ids is not None:
        kw["prompt_token_ids"] = args.token_ids
    else:
        kw["prompt"] = args.prompt
    return kw


def summary(res: GenerateResult) -> str:
    """One line: finish reason, token counts, TTFT and time per output token in ms."""
    n = res.completion_tokens
    tpot_ms = 1000 * res.timing.get("decode_s", 0.0) / (n - 1) if n > 1 else 0.0
    reason = res.finish_reason + (f" ({res.stop_reason})" if res.stop_reason else "")
    return (f"[{res.request_id}] finish_reason={reason} prompt_tokens={res.prompt_tokens} "
            f"completion_tokens={n} ttft={1000 * res.timing.get('ttft_s', 0.0):.1f}ms "
            f"tpot={tpot_ms:.1f}ms")


def _generate(client: LoongClient, args) -> int:
    kw = _request_kwargs(args)
    if args.json or args.no_stream:
        res = client.generate(**kw)
        if args.json:
            print(json.dumps(res.to_dict()))
            return 0
        sys.stdout.write(res.text)
    else:
        seen = []
        stream = client.generate_stream(**kw)
        try:
            for r in stream:
                seen.append(r)
                sys.stdout.write(r.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # cancelling the call aborts the request on the server
            stream.close()
            print("\nloong client: interrupted; request aborted", file=sys.stderr)
            return 130
        res = collect(seen)
    if not res.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    print(summary(res), file=sys.stderr)
    return 0


def _run(client: LoongClient, args) -> int:
    cmd = args.client_command
    if cmd == "generate":
        return _generate(client, args)
    if cmd in ("info", "stats"):
        print(json.dumps(client.model_info() if cmd == "info" else client.stats(), indent=2))
        return 0
    if cmd == "health":
        status = client.health()
        print(status)
        return 0 if status == "SERVING" else 1
    if cmd == "abort":
        found = client.abort(args.request_id)
        print(json.dumps({"request_id": args.request_id, "found": found}))
        return 0 if found else 1
    raise ValueError(f"unknown client command {cmd!r}")


def cmd_client(args) -> int:
    """Run a parsed `loong client ...` command; the process exit status."""
    try:
        client = _connect(args)
    except OSError as e:
        print(f"loong client: error: --tls-ca: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            return _run(client, args)
    except LoongClientError as e:
        print(f"loong client: error: {e}", file=sys.stderr)
        return 2 if e.code == "INVALID_ARGUMENT" else 1
