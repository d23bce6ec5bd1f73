"""Fitting a measured profile: raw samples (as `loong profile` writes them) -> `CostModel`.

Owns: `fit_profile` (relative-error least squares per group size via `fit_prefill` /
`fit_decode`, held-out mean relative errors in `fit_error`, migration bandwidth through
the origin, per-group-size decode fits kept for inspection), `summary_table` and
`fit_warnings` (fits whose held-out error is too high to trust).
Pure Python + numpy: never imports torch (`loong profile --refit` and tests use it alone).
"""
from __future__ import annotations

import numpy as np

from loong.sched.cost_model import (CostModel, DecodeSample, PrefillSample, fit_decode,
                                    fit_prefill, mean_relative_error)


# ----- fitting -----------------------------------------------------------------------------
def _fit_bandwidth(rows: list[dict]) -> tuple[float, float | None]:
    """bytes/s of t = bytes / bw by relative-error least squares (through the origin, the
    cost model's form); returns (bandwidth, mean relative error over the points)."""
    if not rows:
        return 0.0, None
    x = np.array([r["bytes"] for r in rows], float)
    t = np.array([r["time_ms"] / 1e3 for r in rows], float)
    u = x / t                                    # minimise sum((k*x - t)/t)^2, k = 1/bw
    k = float(np.sum(u) / np.sum(u * u))
    return 1.0 / k, mean_relative_error(k * x, t)


_MIN_DECODE_SAMPLES = 3        # one per coefficient (a, b, c)


def fit_profile(raw: dict, name: str, holdout_every: int = 5) -> CostModel:
    """Fit a CostModel from a raw profile (as written by `run_profile`).

    Decode is fitted twice: over every sample (`decode`, the shared fit used when a decode
    group's size is unknown) and per decode group size (the samples' `group_size`, the
    group's instance count) into `decode_by_group`, for each size >= 1 with at least
    `_MIN_DECODE_SAMPLES` samples. Both fits' held-out errors are in `fit_error`."""
    ps = [PrefillSample(r["group_size"], (r["length"],) * r["batch"], r["time_ms"])
          for r in raw["prefill"]]
    ds = [DecodeSample(r["max_mini_batch"], r["max_member_context"], r["time_ms"])
          for r in raw["decode"]]
    if not ps or not ds:
        raise ValueError("profile: needs prefill and decode samples")
    pre, pre_err = fit_prefill(ps, holdout_every)
    dec, dec_err = fit_decode(ds, holdout_every)
    in_sample = {str(g): mean_relative_error([c.time_ms(sum(s.lengths), sum(v * v for v in s.lengths))
                                              for s in ps if s.group_size == g],
                                             [s.time_ms for s in ps if s.group_size == g])
                 for g, c in pre.items()}
    by_g: dict[int, list[DecodeSample]] = {}
    for r, smp in zip(raw["decode"], ds):
        by_g.setdefault(int(r.get("group_size", 0)), []).append(smp)
    decode_by_group, dec_by_g = {}, {}
    for g, rows in sorted(by_g.items()):
        c, e = fit_decode(rows, holdout_every)
        if g >= 1 and len(rows) >= _MIN_DECODE_SAMPLES:
            dec_by_g[g] = c
        decode_by_group[str(g)] = dict(
            a_ms=c.a_ms, b_ms_per_request=c.b_ms_per_request,
            c_ms_per_context_token=c.c_ms_per_context_token, heldout_mre=e,
            shared_fit_mre=mean_relative_error([dec.time_ms(s.max_mini_batch, s.max_member_context)
                                                for s in rows], [s.time_ms for s in rows]))
    bw, mig_err = _fit_bandwidth(raw.get("migration", []))
    if bw <= 0:
        bw = 1e9
    m = raw.get("machine", {})
    fit_error = dict(method=f"relative-error least squares; every {holdout_every}th point of a "
                            f"series held out, then refitted on all points",
                     prefill_heldout_mre={str(g): e for g, e in pre_err.items()},
                     prefill_insample_mre=in_sample,
                     decode_heldout_mre=dec_err,
                     decode_by_group=decode_by_group,
                     migration_insample_mre=mig_err,
                     samples=dict(prefill=len(ps), decode=len(ds),
                                  migration=len(raw.get("migration", []))))
    notes = (f"measured by `loong profile` on {m.get('cpu', '?')} ({m.get('cpu_count', '?')} "
             f"cores): {raw['instances']} instance(s) x {raw['threads_per_instance']} thread(s), "
             f"{raw['device']} {raw['dtype']}, model {raw['model']['path']}; "
             f"{raw['stat']} of repeats; wall clock of ClusterExecutor.execute")
    return CostModel(name, pre, dec, bw, int(raw["kv_bytes_per_token"]),
                     int(raw["tokens_per_instance"]), notes, fit_error, decode_by_group=dec_by_g)


def summary_table(cm: CostModel) -> str:
    fe = cm.fit_error
    lines = [f"cost model {cm.name!r}",
             "  g   A (ms)     B (ms/token)   C (ms/token^2)   held-out MRE   in-sample MRE"]
    for g, c in sorted(cm.prefill.items()):
        ho = fe.get("prefill_heldout_mre", {}).get(str(g))
        ins = fe.get("prefill_insample_mre", {}).get(str(g))
        lines.append(f"  {g:<3d} {c.a_ms:<10.3f} {c.b_ms_per_token:<14.6g} {c.c_ms_per_token2:<16.4g} "
                     f"{_pct(ho):<14s} {_pct(ins)}")
    d = cm.decode
    lines.append(f"  decode (shared, all group sizes): a={d.a_ms:.3f} ms, b={d.b_ms_per_request:.4g} ms/request, "
                 f"c={d.c_ms_per_context_token:.4g} ms/context token; held-out MRE "
                 f"{_pct(fe.get('decode_heldout_mre'))}")
    per_g = fe.get("decode_by_group", {})
    for g in sorted(set(cm.decode_by_group) | {int(k) for k in per_g}):
        e = per_g.get(str(g), {})
        c = cm.decode_by_group.get(g)
        own = (f"a={c.a_ms:.3f}, b={c.b_ms_per_request:.4g}, c={c.c_ms_per_context_token:.4g}"
               if c is not None else "not used (too few samples or no group size)")
        lines.append(f"    decode g={g}: {own}; held-out MRE {_pct(e.get('heldout_mre'))}"
                     f" (shared fit on these points: {_pct(e.get('shared_fit_mre'))})")
    lines.append(f"  migration: {cm.migration_bytes_per_s / 1e9:.3f} GB/s "
                 f"(MRE {_pct(fe.get('migration_insample_mre'))}); KV {cm.kv_bytes_per_token} B/token, "
                 f"{cm.tokens_per_instance} tokens/instance")
    return "\n".join(lines)


# A held-out mean relative error above this makes the simulator's predictions doubtful.
HIGH_HELDOUT_MRE = 0.25


def fit_warnings(cm: CostModel, threshold: float = HIGH_HELDOUT_MRE) -> list[str]:
    """One line per fit whose held-out mean relative error exceeds `threshold` (prefill per
    group size, the shared decode fit, decode per group size), saying what to do."""
    fe = cm.fit_error or {}
    bad: list[str] = []
    for g, e in sorted(fe.get("prefill_heldout_mre", {}).items()):
        if e is not None and e > threshold:
            bad.append(f"prefill g={g}: held-out error {_pct(e)}")
    e = fe.get("decode_heldout_mre")
    if e is not None and e > threshold and not cm.decode_by_group:
        # (with per-group fits the shared one only serves group sizes never profiled)
        bad.append(f"decode (shared): held-out error {_pct(e)}")
    for g, row in sorted(fe.get("decode_by_group", {}).items()):
        e = row.get("heldout_mre")
        if e is not None and e > threshold and int(g) in cm.decode_by_group:
            bad.append(f"decode g={g}: held-out error {_pct(e)}")
    return [f"warning: {b} (> {_pct(threshold)}): the simulator's times for it are unreliable; "
            f"profile again on a quiet machine (check the load average), with the full grid "
            f"(no --quick) or more --repeats" for b in bad]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
