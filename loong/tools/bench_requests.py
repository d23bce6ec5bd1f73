"""Requests for `loong bench`: a workload turned into concrete requests with send times.

Owns: `BenchRequest`, the workload names (`random:IN:OUT`, `leval-docs`, and every `loong
sim` workload), deterministic synthetic prompt ids, length limits from the server's
GetModelInfo, clipping, and arrival schedules identical to the simulator's for the same
rate, arrival process and seed (see loong/tools/bench.py for how they are sent). No torch.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADROOM_TOKENS = 16                 # kept free below max_model_len / the KV capacity
TOKEN_ID_RANGE = (100, 30000)        # synthetic prompt ids: clear of special tokens
CHARS_PER_TOKEN = 3.0                # SmolLM2 on L-Eval: 2.1 (worst) to 5.2 chars/token
SHRINK, MAX_RETRIES = 0.75, 4        # a text prompt the server finds too long: cut, resend
_RANDOM = re.compile(r"^random:(\d+):(\d+)$")


@dataclass
class BenchRequest:
    """One request to send: exactly one of `prompt` / `prompt_token_ids`. `input_len` is
    the prompt length in tokens when known (token-id prompts), else an estimate."""

    index: int
    arrival_s: float                 # scheduled send time, seconds from the start
    input_len: int
    output_len: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    source: str = ""
    question: str | None = None      # text prompts: the part after the document
    retries: int = 0                 # text prompts re-cut shorter after "too long"

    def shorten(self) -> bool:
        """Cut a text prompt's document (what precedes "\\n\\n" + question) by SHRINK;
        False when it cannot shrink (token-id prompts, no document left)."""
        if self.prompt is None or self.question is None:
            return False
        doc = self.prompt[:len(self.prompt) - len(self.question) - 2]
        if not doc:
            return False
        self.prompt = doc[:int(len(doc) * SHRINK)] + "\n\n" + self.question
        self.retries += 1
        return True


def parse_random_workload(name: str) -> tuple[int, int] | None:
    """(input_len, output_len) of "random:IN:OUT", None for any other name."""
    m = _RANDOM.match(name)
    if not m:
        return None
    inp, out = int(m.group(1)), int(m.group(2))
    if inp < 1 or out < 1:
        raise ValueError(f"workload: {name!r} needs lengths >= 1")
    return inp, out


def synthetic_token_ids(length: int, seed: int, index: int,
                        vocab_size: int | None = None) -> list[int]:
    """`length` deterministic pseudo-random ids in TOKEN_ID_RANGE (capped by the vocab)."""
    lo, hi = TOKEN_ID_RANGE
    if vocab_size:
        hi = min(hi, vocab_size)
        lo = min(lo, max(hi - 1, 0))
    rng = np.random.default_rng([seed, index])
    return rng.integers(lo, hi, size=length).tolist()


def length_limits(info: dict, max_input_len: int | None = None,
                  max_output_len: int | None = None) -> tuple[int, int, int]:
    """(max total, max input, max output) tokens per request for this server: total =
    min(max_model_len, instances x KV tokens per instance) - HEADROOM_TOKENS."""
    caps = [int(info.get("max_model_len") or 0)]
    kv = int(info.get("instances") or 0) * int(info.get("kv_tokens_per_instance") or 0)
    if kv > 0:
        caps.append(kv)
    caps = [c for c in caps if c > 0]
    total = (min(caps) if caps else 1 << 30) - HEADROOM_TOKENS
    if total < 2:
        raise ValueError(f"server: max_model_len/KV {caps} leaves no room for a request")
    max_in = min(max_input_len or total - 1, total - 1)
    max_out = min(max_output_len or total - 1, total - 1)
    if max_in < 1 or max_out < 1:
        raise ValueError("max_input_len / max_output_len: must be >= 1")
    return total, max_in, max_out


def clip_lengths(input_len: int, output_len: int, limits: tuple[int, int, int]) -> tuple[int, int]:
    """Clip one request's lengths to `limits` (from `length_limits`); the output keeps its
    length first, the input gives way to fit the total."""
    total, max_in, max_out = limits
    out = max(1, min(output_len, max_out))
    inp = max(1, min(input_len, max_in, total - out))
    return inp, out


def schedule_arrivals(n: int, rate: float, arrival: str = "poisson", cv: float = 1.0,
                      seed: int = 0) -> list[float]:
    """Send times (s from the start): the same draws as `loong sim`; rate 0 = all at 0."""
    from loong.sim.arrivals import gamma_arrivals, poisson_arrivals
    if rate < 0:
        raise ValueError(f"rate: must be >= 0, got {rate}")
    if rate == 0 or n == 0:
        return [0.0] * n
    if arrival == "poisson":
        return [float(t) for t in poisson_arrivals(n, rate, seed)]
    if arrival == "gamma":
        return [float(t) for t in gamma_arrivals(n, rate, cv, seed)]
    raise ValueError(f"arrival: {arrival!r} is not 'poisson' or 'gamma'")


def leval_items(data_dir: str | os.PathLike) -> list[tuple[str, str, str, str]]:
    """(source, document, question, reference answer) per (document, question) of every
    `leval/*.jsonl` under `data_dir` (or `data_dir` itself when it holds the jsonl files)."""
    d = Path(data_dir)
    folder = d / "leval" if (d / "leval").is_dir() else d
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"leval-docs: no *.jsonl in {folder}")
    items = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                outs = obj.get("outputs") or []
                for k, q in enumerate(obj.get("instructions") or []):
                    ref = outs[k] if k < len(outs) and isinstance(outs[k], str) else ""
                    items.append((f"leval-docs:{path.stem}", obj.get("input", ""), q, ref))
    return items


def leval_requests(data_dir, n: int | None, seed: int, limits: tuple[int, int, int],
                   chars_per_token: float = CHARS_PER_TOKEN) -> list[BenchRequest]:
    """`n` (document, question) text requests (all, shuffled, when None). The document is
    cut so the prompt is about limits' input tokens; output = reference answer chars / 4."""
    items = leval_items(data_dir)
    rng = np.random.default_rng(seed)
    n = len(items) if n is None else n
    idx = rng.permutation(len(items)).tolist()
    while len(idx) < n:
        idx += rng.integers(0, len(items), size=n - len(idx)).tolist()
    out = []
    for i, j in enumerate(idx[:n]):
        source, doc, question, ref = items[j]
        est_out = max(1, math.ceil(len(ref) / 4))
        est_in = max(1, math.ceil((len(doc) + len(question) + 2) / chars_per_token))
        inp, outl = clip_lengths(est_in, est_out, limits)
        room = max(0, int(inp * chars_per_token) - len(question) - 2)
        out.append(BenchRequest(i, 0.0, inp, outl, prompt=doc[:room] + "\n\n" + question,
                                question=question, source=source))
    return out


def length_requests(workload: str, data_dir, n: int | None, seed: int, replay: bool = False):
    """(input_len, output_len, real arrival or None, source) of a length-only workload."""
    rnd = parse_random_workload(workload)
    if rnd is not None:
        if n is None:
            raise ValueError("requests: random:IN:OUT needs --requests")
        return [(rnd[0], rnd[1], None, workload)] * n
    from loong.sim.workloads import build_workload
    reqs = build_workload(workload, data_dir, n, seed)
    if replay and any(r.arrival_s is None for r in reqs):
        raise ValueError(f"replay: {workload!r} has no arrival times; give --rate instead")
    return [(r.input_len, r.output_len, r.arrival_s, r.source or workload) for r in reqs]


def build_requests(workload: str, n: int | None, limits: tuple[int, int, int], *,
                   data_dir=None, seed: int = 0, rate: float = 0.0, arrival: str = "poisson",
                   cv: float = 1.0, replay: bool = False, vocab_size: int | None = None,
                   chars_per_token: float = CHARS_PER_TOKEN) -> list[BenchRequest]:
    """The requests of a bench run, with lengths clipped to `limits` and send times."""
    if workload == "leval-docs":
        if replay:
            raise ValueError("replay: leval-docs has no arrival times; give --rate instead")
        reqs = leval_requests(data_dir, n, seed, limits, chars_per_token)
    else:
        reqs = []
        for i, (inp, outl, real, src) in enumerate(length_requests(workload, data_dir, n, seed,
                                                                   replay)):
            inp, outl = clip_lengths(inp, outl, limits)
            reqs.append(BenchRequest(i, real if replay else 0.0, inp, outl, source=src,
                                     prompt_token_ids=synthetic_token_ids(inp, seed, i,
                                                                          vocab_size)))
    if replay:
        t0 = min((r.arrival_s for r in reqs), default=0.0)
        for r in reqs:
            r.arrival_s -= t0
    else:
        for r, t in zip(reqs, schedule_arrivals(len(reqs), rate, arrival, cv, seed)):
            r.arrival_s = t
    return reqs
