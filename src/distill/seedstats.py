"""Statistics over seeds: Student t quantiles, means with 95 % intervals, paired per-seed gains, and the
across-seed summary of a run whose members are replicated per seed (``replica_of`` / ``seed`` in the results).

Pure ``math``: the core's dependencies only. The interval of a KD gain is a t interval over the paired per-seed
differences (student minus the baseline of the same seed: same initial weights, same batches).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

__all__ = ["mean_ci", "paired_gains", "seed_summary", "seed_table", "t_cdf", "t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`, ~1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """``n``, ``mean``, ``sd`` (sample), ``sem``, ``df`` and the two-sided t interval ``lo`` / ``hi``; with one
    value the spread and the interval are None (one run has no interval)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"mean_ci needs finite values, got {xs}")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    out: dict[str, Any] = {"n": n, "mean": mean, "sd": None, "sem": None, "df": n - 1, "lo": None, "hi": None,
                           "confidence": confidence}
    if n >= 2:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
        sem = sd / math.sqrt(n)
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * sem
        out.update(sd=sd, sem=sem, lo=mean - half, hi=mean + half)
    return out


def paired_gains(metric: Any, candidate_by_seed: dict[int, float], reference_by_seed: dict[int, float]) -> list[float]:
    """``metric.gain(candidate, reference)`` for every seed present (and finite) on both sides, by seed."""
    out = []
    for seed in sorted(set(candidate_by_seed) & set(reference_by_seed)):
        c, r = candidate_by_seed[seed], reference_by_seed[seed]
        if _finite(c) and _finite(r):
            out.append(metric.gain(float(c), float(r)))
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _by_seed(replicas: list[dict], get) -> dict[int, float]:
    return {r["seed"]: get(r) for r in replicas if _finite(get(r))}


def _ci_or_none(values: list[float]) -> Optional[dict[str, Any]]:
    return mean_ci(values) if values else None


def seed_summary(kind: Any, results: dict[str, dict]) -> dict[str, dict]:
    """For every base member replicated over seeds (results carrying ``replica_of`` and ``seed``): its seeds,
    :func:`mean_ci` of the selection metric and of the test metric, and for students the paired gains over the
    baseline of the same seed on both (``gain_selection``, ``gain_test``). {} when nothing is replicated."""
    groups: dict[str, list[dict]] = {}
    for r in results.values():
        if r.get("replica_of") is not None and r.get("seed") is not None:
            groups.setdefault(r["replica_of"], []).append(r)
    if not groups:
        return {}
    sel, tm = kind.selection, kind.test_metric

    def get_sel(r):
        return r.get(sel.key)

    def get_test(r):
        return (r.get("test") or {}).get(tm.key)

    base = groups.get("baseline", [])
    out = {}
    for name, reps in groups.items():
        first = reps[0]
        row = {"role": first.get("role"), "main": bool(first.get("main")), "sweep": first.get("sweep"),
               "seeds": sorted(r["seed"] for r in reps),
               "selection": _ci_or_none(list(_by_seed(reps, get_sel).values())),
               "test": _ci_or_none(list(_by_seed(reps, get_test).values())), "gain_selection": None, "gain_test": None}
        if first.get("role") == "student" and base:
            row["gain_selection"] = _ci_or_none(paired_gains(sel, _by_seed(reps, get_sel), _by_seed(base, get_sel)))
            row["gain_test"] = _ci_or_none(paired_gains(tm, _by_seed(reps, get_test), _by_seed(base, get_test)))
        out[name] = row
    return out


def _fmt(col: Any, v: Optional[float]) -> str:
    if v is None:
        return "-"
    return col.format(v) if col is not None else f"{v:.4f}"


def seed_table(kind: Any, results: dict[str, dict]) -> str:
    """The across-seed section as markdown ("" when nothing is replicated): per base member, the number of seeds,
    the mean selection metric, the test metric's mean ± sd, and the KD gain's mean with its 95 % interval."""
    summary = seed_summary(kind, results)
    if not summary:
        return ""
    cols = {c.key: c for c in kind.columns}
    sel_col, test_col, gain_col = cols.get(kind.selection.key), cols.get(kind.test_metric.key), cols.get("gain")
    sel_label = kind.selection.label or kind.selection.key
    test_label = kind.test_metric.label or kind.test_metric.key
    lines = ["## Across seeds", "",
             f"| model | seeds | {sel_label} (mean) | {test_label} (mean ± sd) | KD gain (mean [95 % CI]) |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        t = s["test"] or {}
        sd = "" if t.get("sd") is None else (f" ± {100 * t['sd']:.2f} pt" if getattr(test_col, "fmt", "") == "pct"
                                             else f" ± {t['sd']:.4g}")
        g = s["gain_test"]
        gain = "-" if not g else (f"{_fmt(gain_col, g['mean'])}" + (
            f" [{_fmt(gain_col, g['lo'])}, {_fmt(gain_col, g['hi'])}]" if g.get("lo") is not None else ""))
        lines.append(f"| {name} | {len(s['seeds'])} | {_fmt(sel_col, (s['selection'] or {}).get('mean'))} | "
                     f"{_fmt(test_col, t.get('mean'))}{sd} | {gain} |")
    lines += ["", "KD gain: mean over seeds of (student - baseline of the same seed) on the test metric, the two "
              "models of a seed sharing initial weights and batches; the interval is a t interval over these "
              "paired differences (none from a single seed)."]
    return "\n".join(lines)
