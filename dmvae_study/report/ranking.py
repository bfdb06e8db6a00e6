"""The frontier report's comparison of the matched picks with the heuristic's points (Table 1's rule): per
pair of rows, the gFID difference at each with a Welch interval and one paired by seed, and the words that
say which pairs the two comparisons order differently. `df` is a study table through
`frontier.frontier_frame` (columns `prior`, `weight`, `row`, `status`); `matched` is `frontier.matched_table`'s;
`heuristic` is `frontier.heuristic_weights`'."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dmvae_study.report.stats import by_seed, paired, welch


def point_values(df: pd.DataFrame, prior: str, weight: float | None, metric: str = "gfid") -> pd.Series:
    """The finished seeds' `metric` at one (prior, knob value), indexed by seed (from the row label); empty
    when none (or `weight` is None)."""
    if weight is None or pd.isna(weight):
        return pd.Series(dtype=float)
    g = df[(df["status"] == "ok") & (df["prior"] == prior) & np.isclose(df["weight"].astype(float), float(weight))]
    return by_seed(g, metric)


def ranking(df: pd.DataFrame, matched: pd.DataFrame, heuristic: dict[str, float | None]) -> pd.DataFrame:
    """Every pair (a, b) of rows the matched table picks a point for, a before b in matched order: gFID
    mean(a) - mean(b) with its Welch 95% interval over seeds, at the matched picks (`m_*`) and at the
    heuristic points (`h_*`, NaN when a row's heuristic point has no finished seed); `*_resolved` when the
    interval excludes 0 (never with one seed on a side: no variance, no interval); `*_paired_*` the same
    difference paired by seed over the seeds both points have (`stats.paired`: the rows of one seed share its
    tokenizer and data order); `same_order` whether the heuristic orders the pair as the matched table does
    (None when it cannot say)."""
    picked = matched[matched["weight"].notna()] if len(matched) else matched
    records = []
    for i in range(len(picked)):
        for j in range(i + 1, len(picked)):
            a, b = picked.iloc[i], picked.iloc[j]
            rec: dict = {"a": a["prior"], "b": b["prior"]}
            for tag, wa, wb in (("m", a["weight"], b["weight"]), ("h", heuristic.get(a["prior"]),
                                                                   heuristic.get(b["prior"]))):
                x, y = point_values(df, a["prior"], wa), point_values(df, b["prior"], wb)
                diff, lo, hi = welch(x, y) if len(x) and len(y) else (math.nan, math.nan, math.nan)
                pd_, plo, phi, pn = paired(x, y)
                rec.update({f"{tag}_weight_a": wa, f"{tag}_weight_b": wb, f"{tag}_seeds_a": len(x),
                            f"{tag}_seeds_b": len(y), f"{tag}_gfid_a": float(x.mean()) if len(x) else math.nan,
                            f"{tag}_gfid_b": float(y.mean()) if len(y) else math.nan, f"{tag}_diff": diff,
                            f"{tag}_lo": lo, f"{tag}_hi": hi, f"{tag}_resolved": bool(lo > 0 or hi < 0),
                            f"{tag}_paired_diff": pd_, f"{tag}_paired_lo": plo, f"{tag}_paired_hi": phi,
                            f"{tag}_paired_seeds": pn, f"{tag}_paired_resolved": bool(plo > 0 or phi < 0)})
            m, h = rec["m_diff"], rec["h_diff"]
            rec["same_order"] = None if math.isnan(m) or math.isnan(h) or m == 0 or h == 0 else (m < 0) == (h < 0)
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _diff_text(r: pd.Series, tag: str) -> str:
    """`-0.7 [-5.2, +3.8], not resolved` / `-0.7, one seed at dinov2 @ 1: no interval`."""
    d = f"{r[f'{tag}_diff']:+.1f}"
    if pd.isna(r[f"{tag}_lo"]):
        thin = [f"{p} @ {r[f'{tag}_weight_{s}']:g}" for p, s in ((r["a"], "a"), (r["b"], "b"))
                if r[f"{tag}_seeds_{s}"] < 2]
        return f"{d}, one seed at {' and '.join(thin)}: no interval"
    return (f"{d} [{r[f'{tag}_lo']:+.1f}, {r[f'{tag}_hi']:+.1f}], "
            f"{'resolved' if r[f'{tag}_resolved'] else 'not resolved'}")


def _paired_text(r: pd.Series, tag: str) -> str:
    """`-4.2 [-6.7, -1.7] over 2 seeds, resolved` / `-4.4 on 1 common seed` / `no common seed`."""
    n = int(r[f"{tag}_paired_seeds"])
    if n == 0:
        return "no common seed"
    d = f"{r[f'{tag}_paired_diff']:+.1f}"
    if n < 2:
        return f"{d} on 1 common seed"
    return (f"{d} [{r[f'{tag}_paired_lo']:+.1f}, {r[f'{tag}_paired_hi']:+.1f}] over {n} seeds, "
            f"{'resolved' if r[f'{tag}_paired_resolved'] else 'not resolved'}")


def ranking_text(rk: pd.DataFrame, matched: pd.DataFrame, df: pd.DataFrame,
                 heuristic: dict[str, float | None]) -> list[str]:
    """The page's words: both orders, then each pair the fair comparison ranks differently from the
    heuristic, with the gFID differences and whether the seeds resolve them; the pair table follows."""
    picked = matched[matched["weight"].notna()] if len(matched) else matched
    if len(picked) < 2:
        return ["Fewer than two rows have a matched pick: nothing to rank."]

    def order(points: list[tuple[str, float | None]]) -> str:
        vals = [(p, w, point_values(df, p, w)) for p, w in points]
        shown = sorted([(v.mean(), p, w, len(v)) for p, w, v in vals if len(v)])
        missing = [p for p, w, v in vals if not len(v)]
        return ", ".join(f"{p} @ {w:g} ({g:.1f}, {n} seed{'s' * (n != 1)})" for g, p, w, n in shown) + (
            f"; no finished heuristic point for {', '.join(missing)}" if missing else "")

    lines = [f"- Matched order (best mean gFID above the PSNR floor): "
             f"{order([(r['prior'], r['weight']) for _, r in picked.iterrows()])}.",
             f"- Heuristic order (Table 1's rule: DM weight 10 data-derived, 1 synthetic; baselines at the preset's "
             f"value): {order([(p, heuristic.get(p)) for p in picked['prior']])}."]
    flipped = rk[rk["same_order"] == False]  # noqa: E712  (None: cannot say)
    if flipped.empty:
        lines.append("- The two comparisons order every pair they can both rank the same way.")
    for _, r in flipped.iterrows():
        lines.append(f"- **{r['a']} and {r['b']} swap places.** Matched ({r['a']} @ {r['m_weight_a']:g} against "
                     f"{r['b']} @ {r['m_weight_b']:g}), gFID difference {_diff_text(r, 'm')} (paired by seed: "
                     f"{_paired_text(r, 'm')}); heuristic ({r['h_weight_a']:g} against {r['h_weight_b']:g}), "
                     f"{_diff_text(r, 'h')} (paired: {_paired_text(r, 'h')}).")
    unranked = rk[rk["same_order"].isna()]
    if len(unranked):
        lines.append(f"- Not comparable under the heuristic (a point without a finished seed, or a tie): "
                     f"{', '.join(f'{a}/{b}' for a, b in zip(unranked['a'], unranked['b']))}.")
    table = pd.DataFrame({
        "pair": [f"{a} - {b}" for a, b in zip(rk["a"], rk["b"])],
        "matched gFID diff (Welch)": [_diff_text(r, "m") for _, r in rk.iterrows()],
        "matched, paired by seed": [_paired_text(r, "m") for _, r in rk.iterrows()],
        "heuristic gFID diff (Welch)": ["–" if pd.isna(r["h_diff"]) else _diff_text(r, "h") for _, r in rk.iterrows()],
        "heuristic, paired by seed": [_paired_text(r, "h") for _, r in rk.iterrows()],
        "same order": ["–" if v is None or pd.isna(v) else ("yes" if v else "**no**") for v in rk["same_order"]]})
    from dmvae_study.report.tables import markdown_table
    return lines + ["", "Per pair, mean gFID of the first minus the second: Welch 95% interval over each point's seeds, "
                    "and paired by seed (Student t over the seeds both points have; a seed's rows share its "
                    "tokenizer and data order, so pairing removes that part of the noise):", "",
                    markdown_table(table)]


__all__ = ["point_values", "ranking", "ranking_text"]
