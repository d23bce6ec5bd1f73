"""Cost model: predicted step times for prefill groups, decode groups and KV migration.

Owns: `CostModel` (LoongServe's prefill form T_g = A_g + B_g * sum(l) + C_g * sum(l^2) per
group size g; a decode step T = a + b * (largest mini-batch) + c * (most context tokens one
member reads), one shared fit plus optional per-decode-group-size fits; migration time from
bandwidth), what serving adds to each group's step beyond the executor's time
(`ServingOverhead`, calibrated against a real server by `loong.sim.calibrate`; only the
simulator's clock charges it), fitting those forms from profile samples by
relative-error least squares (`fit_prefill`, `fit_decode`, with the mean relative error on
held-out points), JSON round trips, and the presets (`PRESETS`; their derivations are in
`loong/sched/presets/*.md`).
Pure Python + numpy: never imports torch (the policy and the simulator use it).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class PrefillCoeffs:
    a_ms: float
    b_ms_per_token: float
    c_ms_per_token2: float

    def time_ms(self, sum_l: float, sum_l2: float) -> float:
        return self.a_ms + self.b_ms_per_token * sum_l + self.c_ms_per_token2 * sum_l2


@dataclass(frozen=True)
class DecodeCoeffs:
    a_ms: float                   # per step: weights read, launches, sampling
    b_ms_per_request: float       # per request of the largest mini-batch
    c_ms_per_context_token: float  # per KV token read by the busiest member

    def time_ms(self, batch: int, context_tokens: int) -> float:
        return self.a_ms + self.b_ms_per_request * batch + self.c_ms_per_context_token * context_tokens


@dataclass(frozen=True)
class ServingOverhead:
    """Time a served group step costs beyond the executor's (the manager's scheduling and
    output processing, the server's streaming threads, sharing the cores with the
    instances): `a_ms` per group step plus `b_ms_per_row` per sequence in the group.
    Measured, not derived: `loong profile --serving` fits it so that simulating small
    fixed workloads matches a real server's latencies (`loong.sim.calibrate`). Zero: the
    executor's times alone (the presets from published figures).

    `parallel_slowdown`: the executor's time grows by this share for every other instance
    busy when the group starts. The profile measures one group at a time; where the
    instances, the manager and the server share few cores (a CPU machine), groups running
    side by side slow each other down. Near zero where the host has cores to spare."""
    a_ms: float = 0.0
    b_ms_per_row: float = 0.0
    parallel_slowdown: float = 0.0
    note: str = ""

    def time_ms(self, rows: int) -> float:
        return self.a_ms + self.b_ms_per_row * rows

    def served_ms(self, executor_ms: float, rows: int, others_busy: int) -> float:
        """A served group step: the executor's time, slowed by the instances already busy
        beside it, plus the per-step overhead."""
        return executor_ms * (1.0 + self.parallel_slowdown * others_busy) + self.time_ms(rows)


@dataclass(frozen=True)
class CostModel:
    name: str
    prefill: dict[int, PrefillCoeffs]          # group size -> coefficients
    decode: DecodeCoeffs
    migration_bytes_per_s: float
    kv_bytes_per_token: int
    tokens_per_instance: int                   # KV capacity of one instance
    notes: str = ""
    fit_error: dict = field(default_factory=dict)   # mean relative errors of the fit
    # Replicas of k instances acting as one tensor-parallel unit (the chunked-prefill and
    # PD-disaggregation baselines); k = 1 falls back to `prefill[1]` and `decode`.
    tp_prefill: dict[int, PrefillCoeffs] = field(default_factory=dict)
    tp_decode: dict[int, DecodeCoeffs] = field(default_factory=dict)
    # Decode fitted per decode group size (instances in the group: masters and shard
    # holders); `decode` stays the fit over all sizes. See `decode_coeffs`.
    decode_by_group: dict[int, DecodeCoeffs] = field(default_factory=dict)
    # Charged by the simulator on every group step it runs (not by the policy's plans).
    serving: ServingOverhead = ServingOverhead()

    # ----- predictions ---------------------------------------------------------------
    def prefill_coeffs(self, g: int) -> PrefillCoeffs:
        """Coefficients for group size g; sizes not profiled scale from the nearest smaller
        one as ideal sequence parallelism (B and C divided by the size ratio, A kept)."""
        if g < 1:
            raise ValueError(f"group size must be >= 1, got {g}")
        if g in self.prefill:
            return self.prefill[g]
        known = sorted(self.prefill)
        base = max([k for k in known if k < g], default=known[0])
        c = self.prefill[base]
        r = g / base
        return PrefillCoeffs(c.a_ms, c.b_ms_per_token / r, c.c_ms_per_token2 / r)

    def prefill_ms(self, g: int, lengths: Iterable[int]) -> float:
        ls = list(lengths)
        return self.prefill_coeffs(g).time_ms(sum(ls), sum(x * x for x in ls))

    def prefill_ms_sums(self, g: int, sum_l: float, sum_l2: float) -> float:
        return self.prefill_coeffs(g).time_ms(sum_l, sum_l2)

    def extend_ms(self, items: Iterable[tuple[int, int]]) -> float:
        """Extends batched on one instance, each (cached, new): new tokens appended to a
        sequence of `cached` tokens whose KV is kept. The one-instance prefill fit charged
        for the new tokens only: linear work for them, attention for the part of a
        (cached + new)-token causal prefill they do, (cached + new)^2 - cached^2."""
        c = self.prefill_coeffs(1)
        pairs = list(items)
        return c.time_ms(sum(n for _, n in pairs),
                         sum((p + n) ** 2 - p * p for p, n in pairs))

    def decode_coeffs(self, group_size: int | None = None) -> DecodeCoeffs:
        """Decode coefficients for a decode group of `group_size` instances (masters and
        shard holders). `decode_by_group[group_size]` when fitted; for a size not fitted,
        the nearest fitted size below it; the shared `decode` when `group_size` is None or
        no fitted size is below it (also when `decode_by_group` is empty)."""
        if group_size is None:
            return self.decode
        if group_size < 1:
            raise ValueError(f"decode group size must be >= 1, got {group_size}")
        if group_size in self.decode_by_group:
            return self.decode_by_group[group_size]
        below = [k for k in self.decode_by_group if k < group_size]
        return self.decode_by_group[max(below)] if below else self.decode

    def decode_ms(self, max_mini_batch: int, max_member_context: int,
                  group_size: int | None = None) -> float:
        """One decode step: `max_mini_batch` the largest master's mini-batch,
        `max_member_context` the most KV tokens one member reads, `group_size` the decode
        group's instance count (None: unknown, the shared fit); see `decode_coeffs`."""
        return self.decode_coeffs(group_size).time_ms(max_mini_batch, max_member_context)

    def replica_coeffs(self, k: int) -> tuple[PrefillCoeffs, DecodeCoeffs]:
        """Coefficients of a replica of k instances (tensor parallel over them). Sizes not
        given scale ideally from one instance (every term divided by k)."""
        if k < 1:
            raise ValueError(f"replica size must be >= 1, got {k}")
        p1, d1 = self.prefill_coeffs(1), self.decode
        pre = self.tp_prefill.get(k) or (p1 if k == 1 else PrefillCoeffs(
            p1.a_ms, p1.b_ms_per_token / k, p1.c_ms_per_token2 / k))
        dec = self.tp_decode.get(k) or (d1 if k == 1 else DecodeCoeffs(
            d1.a_ms / k, d1.b_ms_per_request / k, d1.c_ms_per_context_token / k))
        return pre, dec

    def batch_ms(self, k: int, chunks: Iterable[tuple[int, int]],
                 decode_contexts: Sequence[int]) -> float:
        """One iteration of a k-instance replica running a mixed batch (continuous batching,
        chunked prefill). `chunks`: (tokens already held, chunk length) per prompt chunk;
        `decode_contexts`: the context length of each decode request.

        A chunk of n tokens after p held costs the prefill form with l^2 replaced by
        (p + n)^2 - p^2 (its causal attention over the prefix); each decode token adds one
        token of linear work and its context read. Without chunks it is the decode step."""
        pre, dec = self.replica_coeffs(k)
        d, ctx = len(decode_contexts), sum(decode_contexts)
        sum_n = sum_sq = 0
        for p, n in chunks:
            sum_n += n
            sum_sq += (p + n) * (p + n) - p * p
        if sum_n == 0:
            return dec.time_ms(d, ctx)
        return pre.time_ms(sum_n + d, sum_sq) + dec.c_ms_per_context_token * ctx

    def served_ms(self, executor_ms: float, rows: int, others_busy: int = 0) -> float:
        """A served group step of `rows` sequences whose executor time is `executor_ms`,
        started while `others_busy` other instances run (see `ServingOverhead`)."""
        return self.serving.served_ms(executor_ms, rows, others_busy)

    def migration_ms(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.migration_bytes_per_s * 1e3

    # ----- persistence ---------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        for key in ("prefill", "tp_prefill", "tp_decode", "decode_by_group"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        try:
            prefill = {int(k): PrefillCoeffs(**v) for k, v in d["prefill"].items()}
            return cls(d["name"], prefill, DecodeCoeffs(**d["decode"]),
                       float(d["migration_bytes_per_s"]), int(d["kv_bytes_per_token"]),
                       int(d["tokens_per_instance"]), d.get("notes", ""), d.get("fit_error", {}),
                       {int(k): PrefillCoeffs(**v) for k, v in d.get("tp_prefill", {}).items()},
                       {int(k): DecodeCoeffs(**v) for k, v in d.get("tp_decode", {}).items()},
                       # absent in presets written before per-group decode fits
                       {int(k): DecodeCoeffs(**v)
                        for k, v in d.get("decode_by_group", {}).items()},
                       # absent in presets written before serving calibration
                       ServingOverhead(**d.get("serving", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"cost model JSON is missing or has a bad field: {e}") from e


# ----- fitting ---------------------------------------------------------------------------
def _fit_relative(features: np.ndarray, t: np.ndarray, weight_power: float) -> np.ndarray:
    """Least squares on relative error, rows weighted by t**weight_power (LoongServe's
    recipe), with coefficients kept >= 0 by dropping features that come out negative."""
    active = list(range(features.shape[1]))
    while True:
        w = np.sqrt(t ** weight_power) / t
        coef, *_ = np.linalg.lstsq(features[:, active] * w[:, None], t * w, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            out = np.zeros(features.shape[1])
            out[active] = np.maximum(coef, 0.0)
            return out
        active.pop(int(np.argmin(coef)))


def mean_relative_error(pred: Sequence[float], actual: Sequence[float]) -> float:
    p, a = np.asarray(pred, float), np.asarray(actual, float)
    return float(np.mean(np.abs(p - a) / a))


@dataclass(frozen=True)
class PrefillSample:
    group_size: int
    lengths: tuple[int, ...]
    time_ms: float


@dataclass(frozen=True)
class DecodeSample:
    max_mini_batch: int
    max_member_context: int
    time_ms: float


def fit_prefill(samples: Sequence[PrefillSample], holdout_every: int = 5
                ) -> tuple[dict[int, PrefillCoeffs], dict[int, float]]:
    """Fit (A, B, C) per group size. Every `holdout_every`-th sample of a size is held out
    (when the size has at least 6 samples): returns (coefficients, held-out mean relative
    error per size); the final coefficients use every sample."""
    by_g: dict[int, list[PrefillSample]] = {}
    for s in samples:
        if s.time_ms <= 0 or not s.lengths:
            raise ValueError(f"bad prefill sample {s}")
        by_g.setdefault(s.group_size, []).append(s)
    coeffs, errors = {}, {}

    def design(rows):
        return (np.array([[1.0, sum(r.lengths), sum(x * x for x in r.lengths)] for r in rows]),
                np.array([r.time_ms for r in rows]))

    for g, rows in sorted(by_g.items()):
        if len(rows) >= 6 and holdout_every > 1:
            train = [r for i, r in enumerate(rows) if i % holdout_every]
            test = [r for i, r in enumerate(rows) if not i % holdout_every]
            x, t = design(train)
            c = PrefillCoeffs(*_fit_relative(x, t, 0.1))
            errors[g] = mean_relative_error(
                [c.time_ms(sum(r.lengths), sum(v * v for v in r.lengths)) for r in test],
                [r.time_ms for r in test])
        x, t = design(rows)
        coeffs[g] = PrefillCoeffs(*_fit_relative(x, t, 0.1))
    return coeffs, errors


def fit_decode(samples: Sequence[DecodeSample], holdout_every: int = 5
               ) -> tuple[DecodeCoeffs, float | None]:
    """Fit (a, b, c) of the decode step; returns (coefficients, held-out mean relative error)."""
    rows = list(samples)
    if not rows or any(s.time_ms <= 0 for s in rows):
        raise ValueError("decode samples must be non-empty with positive times")

    def design(rs):
        return (np.array([[1.0, r.max_mini_batch, r.max_member_context] for r in rs]),
                np.array([r.time_ms for r in rs]))

    err = None
    if len(rows) >= 6 and holdout_every > 1:
        train = [r for i, r in enumerate(rows) if i % holdout_every]
        test = [r for i, r in enumerate(rows) if not i % holdout_every]
        c = DecodeCoeffs(*_fit_relative(*design(train), 0.5))
        err = mean_relative_error([c.time_ms(r.max_mini_batch, r.max_member_context) for r in test],
                                  [r.time_ms for r in test])
    return DecodeCoeffs(*_fit_relative(*design(rows), 0.5)), err


# ----- presets -----------------------------------------------------------------------------
def _a800_lwm7b_tp2() -> CostModel:
    """LWM-Text-7B (Llama-2-7B shapes, fp16) on TP2 instances of A800-80GB, as LoongServe
    ran it (4 instances per node). Derivation: loong/sched/presets/A800_LWM7B.md."""
    b1, c1 = 0.03727, 7.27e-7           # one TP2 instance, from Figure 3's SP4 x TP2 rows
    prefill = {}
    for g in range(1, 9):
        eff = 0.98 ** (g - 1)            # ring synchronisation loss per extra member
        prefill[g] = PrefillCoeffs(15.0 + 4.0 * (g - 1), b1 / (g * eff), c1 / (g * eff))
    return CostModel(
        "a800-lwm7b-tp2", prefill, DecodeCoeffs(10.0, 0.08, 1.64e-4),
        migration_bytes_per_s=400e9 * 2, kv_bytes_per_token=512 * 1024,
        tokens_per_instance=210_000,
        # TP4 and TP8 over 2 and 4 instances (the baselines' replicas): TP8 fitted to
        # Figure 3's TP8 rows, TP4 in between (geometric); see A800_LWM7B.md.
        tp_prefill={2: PrefillCoeffs(15.0, 0.02371, 3.58e-7), 4: PrefillCoeffs(15.0, 0.01509, 1.759e-7)},
        tp_decode={2: DecodeCoeffs(10.0, 0.035, 8.2e-5), 4: DecodeCoeffs(9.85, 0.0157, 4.1e-5)},
        notes="derived from LoongServe's published figures and first principles; "
              "see loong/sched/presets/A800_LWM7B.md")


PRESETS = {"a800-lwm7b-tp2": _a800_lwm7b_tp2}
# Presets measured by `loong profile` ship as JSON beside their write-ups.
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


def preset_names() -> list[str]:
    files = [f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json")] \
        if os.path.isdir(PRESET_DIR) else []
    return sorted(set(PRESETS) | set(files))


def get_preset(name: str) -> CostModel:
    if name in PRESETS:
        return PRESETS[name]()
    path = os.path.join(PRESET_DIR, name + ".json")
    if "/" not in name and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return CostModel.from_json(f.read())
    raise ValueError(f"unknown cost-model preset {name!r}; known: {preset_names()}")


def load_cost_model(name_or_path: "str | CostModel") -> CostModel:
    """A preset name (built in or a JSON file in loong/sched/presets/), or a path to a JSON
    file written by `CostModel.to_json`; a `CostModel` is returned as it is."""
    if isinstance(name_or_path, CostModel):
        return name_or_path
    if name_or_path in preset_names():
        return get_preset(name_or_path)
    try:
        with open(name_or_path, encoding="utf-8") as f:
            return CostModel.from_json(f.read())
    except FileNotFoundError:
        raise ValueError(f"cost model {name_or_path!r} is neither a preset {preset_names()} "
                         f"nor a JSON file") from None
