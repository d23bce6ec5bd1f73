"""Trace files: `WorkloadRequest` and the readers of every length/trace format.

Owns: `WorkloadRequest`, `WorkloadFormatError`, the readers (etalon/vidur stats CSV, Azure
CSV with arrivals, L-Eval lengths CSV, Mooncake jsonl, generic jsonl, and `read_trace`
which picks the format), and locating the data directory (`default_data_dir`,
`trace_path`). The named workload builders live in `loong.sim.workloads`.

Pure Python + numpy. Must not import torch, nor anything of loong outside `loong.errors`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Iterable, Sequence

from loong.errors import LoongError

PathLike = str | os.PathLike


class WorkloadFormatError(LoongError, ValueError):
    """A trace file is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: lengths in tokens, and its arrival time when known.

    `arrival_s` is seconds from the start of the workload, or None for length-only sets
    (give them arrivals with `loong.sim.arrivals`). `source` says where it came from,
    e.g. "sharegpt", "leval:coursera", "lveval:factrecall_en:64k", "azure-code".
    """

    input_len: int
    output_len: int
    arrival_s: float | None = None
    source: str = ""
    # Prefix identity when the trace has it (Mooncake): block i of the prompt (512 tokens)
    # is the block named hash_ids[i]; equal leading ids mean a shared prefix.
    hash_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        a = self.arrival_s
        if a is not None and (isinstance(a, bool) or not isinstance(a, Real)
                              or not math.isfinite(a) or a < 0):
            raise ValueError(f"arrival_s must be a finite float >= 0 or None, got {a!r}")


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------

def _err(path: PathLike, line: int, msg: str) -> WorkloadFormatError:
    return WorkloadFormatError(f"{os.fspath(path)}:{line}: {msg}")


def _int_field(value, field: str, path: PathLike, line: int) -> int:
    """A token count: an int >= 1 (integral floats such as "74.0" are accepted)."""
    if isinstance(value, bool):
        raise _err(path, line, f"{field}={value!r} is not an integer")
    try:
        if isinstance(value, str):
            value = value.strip()
            try:
                v = int(value)
            except ValueError:
                f = float(value)
                if not f.is_integer():
                    raise ValueError from None
                v = int(f)
        elif isinstance(value, Integral):
            v = int(value)
        elif isinstance(value, float) and value.is_integer():
            v = int(value)
        else:
            raise ValueError
    except (ValueError, OverflowError):
        raise _err(path, line, f"{field}={value!r} is not an integer") from None
    if v < 1:
        raise _err(path, line, f"{field}={v} must be >= 1")
    return v


def _time_field(value, field: str, path: PathLike, line: int, scale: float = 1.0) -> float:
    if isinstance(value, bool):
        raise _err(path, line, f"{field}={value!r} is not a number")
    try:
        t = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _err(path, line, f"{field}={value!r} is not a number") from None
    if not math.isfinite(t) or t < 0:
        raise _err(path, line, f"{field}={value!r} must be a finite number >= 0")
    return t * scale


def _csv_rows(path: PathLike, required: Sequence[str]) -> Iterable[tuple[int, dict]]:
    """(line number, row dict) of a headed csv, after checking the header has `required`."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise _err(path, 1, "empty file (expected a header line)")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise _err(path, 1, f"header {header} lacks column(s) {missing}")
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise _err(path, reader.line_num,
                           f"{len(row)} fields, header has {len(header)}")
            yield reader.line_num, dict(zip(header, row))


def _jsonl_rows(path: PathLike) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _err(path, lineno, f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise _err(path, lineno, "expected a JSON object")
            yield lineno, obj


def _need(obj: dict, keys: Sequence[str], path: PathLike, line: int) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _err(path, line, f"missing key(s) {missing}")


def read_stats_csv(path: PathLike, source: str = "stats") -> list[WorkloadRequest]:
    """etalon/vidur length-stats csv: `num_prefill_tokens,num_decode_tokens[,...]`.

    No arrival times (sharegpt_8k_llama2.csv, arxiv_summarization_llama2.csv)."""
    return [WorkloadRequest(_int_field(r["num_prefill_tokens"], "num_prefill_tokens", path, ln),
                            _int_field(r["num_decode_tokens"], "num_decode_tokens", path, ln),
                            None, source)
            for ln, r in _csv_rows(path, ("num_prefill_tokens", "num_decode_tokens"))]


def read_azure_csv(path: PathLike, source: str = "azure") -> list[WorkloadRequest]:
    """Azure 2023 trace as vidur ships it: `arrived_at,num_prefill_tokens,num_decode_tokens`
    with `arrived_at` in seconds; real arrival times are kept as they are."""
    cols = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
    return [WorkloadRequest(_int_field(r["num_prefill_tokens"], "num_prefill_tokens", path, ln),
                            _int_field(r["num_decode_tokens"], "num_decode_tokens", path, ln),
                            _time_field(r["arrived_at"], "arrived_at", path, ln), source)
            for ln, r in _csv_rows(path, cols)]


def read_leval_csv(path: PathLike, source: str = "leval") -> list[WorkloadRequest]:
    """L-Eval lengths csv `task,input_len,output_len`; source becomes "leval:<task>"."""
    out = []
    for ln, r in _csv_rows(path, ("task", "input_len", "output_len")):
        task = r["task"].strip()
        if not task:
            raise _err(path, ln, "empty task")
        out.append(WorkloadRequest(_int_field(r["input_len"], "input_len", path, ln),
                                   _int_field(r["output_len"], "output_len", path, ln),
                                   None, f"{source}:{task}"))
    return out


def read_mooncake_jsonl(path: PathLike, source: str = "mooncake") -> list[WorkloadRequest]:
    """Mooncake FAST'25 trace: `{"timestamp" (ms), "input_length", "output_length",
    "hash_ids"}` a line. timestamp / 1000 -> arrival_s; hash_ids (one per 512-token block of
    the prompt; equal leading ids are a shared prefix) are kept."""
    out = []
    for ln, obj in _jsonl_rows(path):
        _need(obj, ("timestamp", "input_length", "output_length"), path, ln)
        hids = obj.get("hash_ids")
        out.append(WorkloadRequest(_int_field(obj["input_length"], "input_length", path, ln),
                                   _int_field(obj["output_length"], "output_length", path, ln),
                                   _time_field(obj["timestamp"], "timestamp", path, ln, 1e-3),
                                   source, tuple(int(h) for h in hids) if hids else None))
    return out


def read_jsonl_trace(path: PathLike, source: str = "jsonl") -> list[WorkloadRequest]:
    """Generic trace: `{"input_len": int, "output_len": int, "arrival_s": float}` a line;
    `arrival_s` may be absent or null. An optional "source" string is kept."""
    out = []
    for ln, obj in _jsonl_rows(path):
        _need(obj, ("input_len", "output_len"), path, ln)
        arr = obj.get("arrival_s")
        src = obj.get("source", source)
        if not isinstance(src, str):
            raise _err(path, ln, f"source={src!r} is not a string")
        out.append(WorkloadRequest(_int_field(obj["input_len"], "input_len", path, ln),
                                   _int_field(obj["output_len"], "output_len", path, ln),
                                   None if arr is None else _time_field(arr, "arrival_s", path, ln),
                                   src))
    return out


def read_trace(path: PathLike, source: str | None = None) -> list[WorkloadRequest]:
    """Any of the formats above, told apart by the csv header or the first jsonl object."""
    p = Path(path)
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            first = next((t for t in f if t.strip()), "")
        keys = set(json.loads(first)) if first.strip().startswith("{") else set()
        if "input_length" in keys:
            return read_mooncake_jsonl(p, source or "mooncake")
        return read_jsonl_trace(p, source or "jsonl")
    with open(p, newline="", encoding="utf-8") as f:
        header = {h.strip() for h in next(csv.reader(f), [])}
    if {"task", "input_len", "output_len"} <= header:
        return read_leval_csv(p, source or "leval")
    if "arrived_at" in header:
        return read_azure_csv(p, source or "azure")
    return read_stats_csv(p, source or "stats")


# ---------------------------------------------------------------------------------------
# Data location
# ---------------------------------------------------------------------------------------

def default_data_dir() -> str | None:
    """`../shared/data` relative to the repository root of a source checkout, if it exists.

    Documented convenience for tests and experiments only; nothing reads it implicitly."""
    root = Path(__file__).resolve().parents[2]
    d = root.parent / "shared" / "data"
    return str(d) if d.is_dir() else None


TRACE_FILES = {
    "sharegpt": "sharegpt_8k_llama2.csv",
    "sharegpt-loong": "sharegpt_8k_llama2.csv",
    "arxiv": "arxiv_summarization_llama2.csv",
    "azure-code": "azure_code_2023.csv",
    "azure-conv": "azure_conv_2023.csv",
    "mooncake": "mooncake_conversation.jsonl",
    "leval": "leval_llama2_lengths.csv",
}


def trace_path(data_dir: PathLike | None, filename: str) -> Path:
    """`data_dir/traces/filename` or `data_dir/filename`, whichever exists."""
    if data_dir is None:
        raise FileNotFoundError(
            f"{filename}: no data_dir given (pass the folder holding the traces, e.g. "
            f"loong.sim.workloads.default_data_dir() in a checkout with ../shared/data)")
    d = Path(data_dir)
    for p in (d / "traces" / filename, d / filename):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{filename}: not found in {d} or {d / 'traces'}")
