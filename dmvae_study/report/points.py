"""The frontier report's per-point tables: every (prior, knob value) with its seeds' statistics, and every
point against its own prior's heuristic point (Table 1's weight), Welch and paired by seed.

`df` is a study table through `frontier.frontier_frame` (columns `prior`, `weight`, `point`, `row`,
`status`, the metrics); `summary` is `frontier.summarise`'s; `heuristic` is `frontier.heuristic_weights`'.
These are the tables a reading of the study quotes ("weight 1 against 10, paired by seed: ..."), so it
quotes a computation, not a hand-made one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dmvae_study.report.ranking import point_values
from dmvae_study.report.stats import by_seed, paired, welch

AGAINST_METRICS = ("gfid", "psnr")


def _seeds(g: pd.DataFrame) -> list[int]:
    return sorted(by_seed(g.assign(_one=1.0), "_one").index)


def _cell(r: pd.Series, m: str, digits: int) -> str:
    """`62.3 [59.3, 65.4]`, or the mean alone for one seed (no interval)."""
    mean, lo, hi = r.get(f"{m}_mean"), r.get(f"{m}_lo"), r.get(f"{m}_hi")
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")


def points_table(summary: pd.DataFrame, df: pd.DataFrame, heuristic: dict[str, float | None]) -> pd.DataFrame:
    """One display line per point with a finished seed: its seeds, PSNR / rFID / gFID as mean [95% interval
    of the mean], the range of the matching distance after DMD over its seeds, each seed's wall minutes,
    and marks: `T1` at the prior's heuristic point (Table 1's weight), `P` on the prior's Pareto front."""
    ok = df[df["status"] == "ok"]
    lines = []
    for _, r in summary[summary["n"] > 0].iterrows():
        g = ok[ok["point"] == r["point"]]
        seeds = _seeds(g)
        swd = pd.to_numeric(g["matching_swd"], errors="coerce").dropna() if "matching_swd" in g else pd.Series([])
        wall = by_seed(g, "wall_s") / 60 if "wall_s" in g else pd.Series(dtype=float)
        h = heuristic.get(r["prior"])
        marks = ("T1 " if h is not None and np.isclose(r["weight"], h) else "") + ("P" if r["pareto"] else "")
        lines.append({
            "point": r["point"], "seeds": ", ".join(map(str, seeds)),
            "PSNR (dB)": _cell(r, "psnr", 2), "rFID": _cell(r, "rfid", 1), "gFID": _cell(r, "gfid", 1),
            "match SW": ("–" if swd.empty else f"{swd.min():.3f}" if len(swd) == 1 or swd.min() == swd.max()
                         else f"{swd.min():.3f}-{swd.max():.3f}"),
            "wall min per seed": ", ".join(f"{w:.0f}" for w in wall.sort_index()) if len(wall) else "–",
            "marks": marks.strip()})
    return pd.DataFrame(lines, columns=["point", "seeds", "PSNR (dB)", "rFID", "gFID", "match SW",
                                        "wall min per seed", "marks"])


def against_heuristic(df: pd.DataFrame, heuristic: dict[str, float | None],
                      metrics: tuple[str, ...] = AGAINST_METRICS) -> pd.DataFrame:
    """Per prior whose heuristic point has a finished seed, every other point of that prior against it:
    per metric, mean(point) - mean(heuristic) with its Welch 95% interval over each point's seeds
    (`<m>_diff`, `<m>_lo`, `<m>_hi`, `<m>_resolved`) and paired by seed over the seeds both have
    (`<m>_paired_diff`, `_lo`, `_hi`, `_seeds`, `_resolved`; a seed's trials share its tokenizer, data
    order and initialisation). "Resolved": the interval excludes 0 (never without an interval)."""
    ok = df[df["status"] == "ok"]
    records = []
    for prior, g in ok.groupby("prior", sort=False):
        h = heuristic.get(prior)
        if h is None:
            continue
        at_h = np.isclose(g["weight"].astype(float), float(h))
        if not at_h.any():
            continue
        for w, p in g[~at_h].groupby("weight", sort=True):
            rec: dict = {"prior": prior, "weight": float(w), "heuristic_weight": float(h),
                         "seeds": len(_seeds(p)), "heuristic_seeds": len(_seeds(g[at_h]))}
            for m in metrics:
                x, y = point_values(df, prior, w, m), point_values(df, prior, h, m)
                diff, lo, hi = welch(x, y)
                pdiff, plo, phi, pn = paired(x, y)
                rec.update({f"{m}_diff": diff, f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_resolved": bool(lo > 0 or hi < 0),
                            f"{m}_paired_diff": pdiff, f"{m}_paired_lo": plo, f"{m}_paired_hi": phi,
                            f"{m}_paired_seeds": pn, f"{m}_paired_resolved": bool(plo > 0 or phi < 0)})
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _diff(d: float, lo: float, hi: float, digits: int, n: int | None = None) -> str:
    """`-1.8 [-4.8, +1.3]`, bold when resolved; the difference alone without an interval (`(1 seed)` when
    `n`, the seeds on the thinner side, is 1)."""
    if pd.isna(d):
        return "–"
    s = f"{d:+.{digits}f}"
    if pd.isna(lo):
        return s + (" (1 seed)" if n == 1 else "")
    s += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"**{s}**" if lo > 0 or hi < 0 else s


def against_text(ah: pd.DataFrame, metrics: tuple[str, ...] = AGAINST_METRICS) -> list[str]:
    """The page's table of `against_heuristic`: one line per point, Welch and paired cells per metric."""
    if ah.empty:
        return ["No prior has a finished seed at its heuristic point: nothing to compare against."]
    from dmvae_study.report.tables import markdown_table
    names = {"gfid": "gFID", "psnr": "PSNR (dB)", "rfid": "rFID"}
    digits = {"gfid": 1, "psnr": 2, "rfid": 1}
    show = pd.DataFrame({"prior": ah["prior"],
                         "point - Table 1's": [f"{w:g} - {h:g}" for w, h in zip(ah["weight"], ah["heuristic_weight"])],
                         "seeds": [f"{a} / {b}" for a, b in zip(ah["seeds"], ah["heuristic_seeds"])]})
    for m in metrics:
        show[f"{names.get(m, m)} (Welch)"] = [_diff(r[f"{m}_diff"], r[f"{m}_lo"], r[f"{m}_hi"], digits.get(m, 2),
                                                    min(int(r["seeds"]), int(r["heuristic_seeds"])))
                                              for _, r in ah.iterrows()]
        show[f"{names.get(m, m)} (paired)"] = [
            "–" if r[f"{m}_paired_seeds"] == 0 else
            _diff(r[f"{m}_paired_diff"], r[f"{m}_paired_lo"], r[f"{m}_paired_hi"], digits.get(m, 2),
                  int(r[f"{m}_paired_seeds"])) + (f" ({int(r[f'{m}_paired_seeds'])} seeds)"
                                                 if r[f"{m}_paired_seeds"] > 1 else "")
            for _, r in ah.iterrows()]
    resolved = [(r["prior"], r["weight"], m) for _, r in ah.iterrows() for m in metrics
                if r[f"{m}_resolved"] or r[f"{m}_paired_resolved"]]
    said = (", ".join(f"{p} @ {w:g} on {names.get(m, m)}" for p, w, m in resolved) if resolved else "none")
    return ["Each point minus its prior's Table 1 point (DM weight 10 for data-derived priors, 1 for synthetic "
            "ones; the baselines at the preset's value): Welch 95% interval over each point's seeds, and paired "
            "by seed (Student t over the seeds both have). Bold: resolved (the interval excludes 0). Seeds: the "
            "point's / Table 1's.", "", markdown_table(show), "",
            f"Resolved by either interval: {said}."]


__all__ = ["against_heuristic", "against_text", "points_table"]
