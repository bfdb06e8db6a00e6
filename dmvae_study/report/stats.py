"""Seed statistics of a study (rows `<row>-s<seed>`): per row and metric the mean, standard deviation and
95% interval of the mean over seeds (Student t), and, per pair of rows, the difference of mean gFID with
its 95% interval (Welch): "resolved" when the interval excludes 0, i.e. the seeds can tell the two apart."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

SEED_LABEL = re.compile(r"^(?P<row>.+)-s(?P<seed>\d+)$")
METRICS = ("rfid", "psnr", "gfid", "is", "matching_swd")
LOWER_IS_BETTER = {"rfid": True, "psnr": False, "gfid": True, "is": False, "matching_swd": True}


def base_row(label: str) -> str:
    m = SEED_LABEL.match(str(label))
    return m["row"] if m else str(label)


def seed_of(label: str) -> int | None:
    """The seed of a `<row>-s<seed>` label; None for a label without one."""
    m = SEED_LABEL.match(str(label))
    return int(m["seed"]) if m else None


def t_quantile(df: float, q: float = 0.975) -> float:
    from scipy import stats
    return float(stats.t.ppf(q, df))


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of `values` and its Student-t interval (`level`, n - 1 degrees of freedom): `(mean, lo, hi)`.
    NaN interval below two values (no variance to estimate); NaN mean with none."""
    v = np.asarray(values, float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(n - 1, 0.5 + level / 2) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def seed_summary(table: pd.DataFrame, metrics: tuple[str, ...] = METRICS, min_seeds: int = 2) -> pd.DataFrame | None:
    """One line per row: `n` seeds and, per metric, `<m>_mean`, `<m>_std` (sample, ddof 1), `<m>_lo`,
    `<m>_hi` (mean -+ t_{0.975, n-1} std / sqrt(n); NaN for one seed). None when no row has `min_seeds`
    seeds."""
    if "row" not in table or table.empty:
        return None
    ok = table[table["status"] == "ok"] if "status" in table else table
    groups = ok.assign(_row=ok["row"].map(base_row)).groupby("_row", sort=False)
    if max((len(g) for _, g in groups), default=0) < min_seeds:
        return None
    records = []
    for row, g in groups:
        rec: dict = {"row": row, "n": len(g)}
        for m in metrics:
            v = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(float) if m in g else np.array([])
            mean, lo, hi = mean_interval(v)
            std = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            rec.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_lo": lo, f"{m}_hi": hi})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def welch(x, y, level: float = 0.95) -> tuple[float, float, float]:
    """mean(x) - mean(y) and its Welch interval (`level`, Welch-Satterthwaite degrees of freedom): `(diff,
    lo, hi)`. The interval is NaN when either side has fewer than two values (no variance to estimate)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return diff, math.nan, math.nan
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se > 0 else len(x) + len(y) - 2
    half = t_quantile(dof, 0.5 + level / 2) * se
    return diff, diff - half, diff + half


def paired(x: pd.Series, y: pd.Series, level: float = 0.95) -> tuple[float, float, float, int]:
    """Paired by seed: the mean of x[s] - y[s] over the seeds `s` both Series hold (their index), its Student-t
    interval (`level`) and the number of common seeds: `(diff, lo, hi, n)`. Trials of one seed share the
    seed's tokenizer, data order and initialisation, so pairing removes that shared part of the noise. NaN
    interval below two common seeds; NaN difference with none."""
    common = x.index.intersection(y.index)
    d = (x.loc[common].to_numpy(float) - y.loc[common].to_numpy(float)) if len(common) else np.array([])
    return (*mean_interval(d, level), len(d))


def by_seed(g: pd.DataFrame, metric: str) -> pd.Series:
    """`metric` of one row's seeds, indexed by the seed of each label (`<row>-s<seed>`; position otherwise)."""
    seeds = [i if (s := seed_of(r)) is None else s for i, r in enumerate(g["row"])]
    return pd.Series(pd.to_numeric(g[metric], errors="coerce").to_numpy(float), index=seeds).dropna()


def pairwise(table: pd.DataFrame, metric: str = "gfid", first: str | None = None) -> pd.DataFrame | None:
    """Every pair of rows with two or more seeds: `diff` = mean(a) - mean(b) of `metric`, its Welch 95%
    interval `lo`, `hi`, and `resolved` (the interval excludes 0); and the same difference paired by seed
    over the seeds both rows have (`paired_diff`, `paired_lo`, `paired_hi`, `paired_seeds`,
    `paired_resolved`; `paired`). Pairs with `first` (e.g. the semantic prior) come first."""
    if "row" not in table or metric not in table:
        return None
    ok = table[table["status"] == "ok"] if "status" in table else table
    vals = {r: by_seed(g, metric) for r, g in ok.assign(_row=ok["row"].map(base_row)).groupby("_row", sort=False)}
    vals = {r: v for r, v in vals.items() if len(v) >= 2}
    names = list(vals)
    if first in names:
        names.remove(first)
        names.insert(0, first)
    records = []
    for a, b in itertools.combinations(names, 2):
        x, y = vals[a], vals[b]
        diff, lo, hi = welch(x, y)
        better = a if (diff < 0) == LOWER_IS_BETTER.get(metric, True) else b
        resolved = bool(lo > 0 or hi < 0)
        pdiff, plo, phi, pn = paired(x, y)
        records.append({"a": a, "b": b, f"{metric}_a": float(x.mean()), f"{metric}_b": float(y.mean()), "diff": diff,
                        "lo": lo, "hi": hi, "resolved": resolved, "better": better if resolved else "-",
                        "paired_diff": pdiff, "paired_lo": plo, "paired_hi": phi, "paired_seeds": pn,
                        "paired_resolved": bool(plo > 0 or phi < 0)})
    return pd.DataFrame.from_records(records) if records else None


def display_summary(summary: pd.DataFrame, metrics: tuple[str, ...] = ("rfid", "psnr", "gfid", "is")) -> pd.DataFrame:
    """`mean +- std [lo, hi]` strings per metric, one line per row: the table the README shows."""
    out = pd.DataFrame({"row": summary["row"], "seeds": summary["n"]})
    for m in metrics:
        if f"{m}_mean" in summary:
            out[m] = [f"{r[f'{m}_mean']:.3g} ± {r[f'{m}_std']:.2g} [{r[f'{m}_lo']:.3g}, {r[f'{m}_hi']:.3g}]"
                      for _, r in summary.iterrows()]
    return out


__all__ = ["base_row", "by_seed", "display_summary", "mean_interval", "paired", "pairwise", "seed_of", "seed_summary",
           "welch"]
