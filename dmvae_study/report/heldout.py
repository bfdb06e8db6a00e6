"""The matched picks out of sample: leave one seed out.

`frontier.matched_table` picks each row's knob value with the lowest mean gFID over the same seeds whose mean
it then reports. The minimum of several noisy means sits below the mean of the value it picks, so the matched
gFID is optimistic, and more so for a row with more feasible values or noisier seeds: a comparison of rows
at their picks favours the row with the most chances. Here each seed is held out in turn: the pick is made
by the same rule (mean PSNR >= the floor, lowest mean gFID) on the other seeds' trials, and scored on the
held-out seed's trial at that value. The mean of the held-out scores estimates what the picking rule
delivers on a new seed; rows are compared paired by held-out seed (a seed's trials share its tokenizer,
data order and initialisation).

`df` is a study table through `frontier.frontier_frame` (columns `prior`, `weight`, `row`, `status`,
`gfid`, `psnr`); `matched` is `frontier.matched_table`'s.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dmvae_study.report.stats import mean_interval, paired, seed_of


def held_out_folds(df: pd.DataFrame, floor: float) -> pd.DataFrame:
    """One line per (prior, held-out seed) of a prior with two or more seeds: the pick that
    `frontier.matched_table` makes on the other seeds' summary (`pick`; NaN when no value meets `floor`
    there), how many values met the floor (`feasible`), and the pick's `gfid` and `psnr` on the held-out
    seed (NaN when that seed has no finished trial there)."""
    from dmvae_study.report.frontier import matched_table, summarise  # frontier imports this module
    ok = df[df["status"] == "ok"].assign(_seed=lambda d: d["row"].map(seed_of))
    ok = ok[ok["_seed"].notna()]
    records = []
    for prior, g in ok.groupby("prior", sort=False):
        seeds = sorted(g["_seed"].unique())
        if len(seeds) < 2:
            continue
        for s in seeds:
            picked = matched_table(summarise(g[g["_seed"] != s]), floor).iloc[0]
            rec = {"prior": prior, "held_out_seed": int(s), "feasible": int(picked["feasible"]), "pick": math.nan,
                   "gfid": math.nan, "psnr": math.nan}
            if picked["feasible"]:
                w = float(picked["weight"])
                test = g[(g["_seed"] == s) & np.isclose(g["weight"].astype(float), w)]
                rec.update({"pick": w, "gfid": float(test["gfid"].mean()) if len(test) else math.nan,
                            "psnr": float(test["psnr"].mean()) if len(test) else math.nan})
            records.append(rec)
    return pd.DataFrame.from_records(records, columns=["prior", "held_out_seed", "feasible", "pick", "gfid", "psnr"])


def held_out_summary(folds: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """Per prior: the held-out picks, the mean held-out gFID with its Student-t 95% interval over the scored
    folds, the in-sample matched gFID and `optimism` = held-out mean - in-sample (how much the pick
    flattered the row). Sorted by held-out mean."""
    insample = dict(zip(matched["prior"], matched["gfid_mean"])) if len(matched) else {}
    records = []
    for prior, g in folds.groupby("prior", sort=False):
        v = g["gfid"].dropna().to_numpy(float)
        mean, lo, hi = mean_interval(v)
        ins = insample.get(prior, math.nan)
        ins = math.nan if ins is None or pd.isna(ins) else float(ins)
        records.append({"prior": prior, "folds": len(v),
                        "picks": ", ".join("–" if pd.isna(w) else f"{w:g}" for w in g["pick"]),
                        "gfid_mean": mean, "gfid_lo": lo, "gfid_hi": hi,
                        "insample_gfid": ins, "optimism": mean - ins})
    out = pd.DataFrame.from_records(records, columns=["prior", "folds", "picks", "gfid_mean", "gfid_lo", "gfid_hi",
                                                      "insample_gfid", "optimism"])
    return out.sort_values("gfid_mean", na_position="last", kind="stable").reset_index(drop=True)


def held_out_pairs(folds: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Every pair of priors in `order` (a before b): held-out gFID of a minus b, paired by held-out seed."""
    per = {p: g.set_index("held_out_seed")["gfid"].dropna() for p, g in folds.groupby("prior", sort=False)}
    records = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            d, lo, hi, n = paired(per.get(a, pd.Series(dtype=float)), per.get(b, pd.Series(dtype=float)))
            records.append({"a": a, "b": b, "diff": d, "lo": lo, "hi": hi, "seeds": n,
                            "resolved": bool(lo > 0 or hi < 0)})
    return pd.DataFrame.from_records(records, columns=["a", "b", "diff", "lo", "hi", "seeds", "resolved"])


def held_out_text(summary: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """The frontier page's section: the per-row table and the pairs in words."""
    from dmvae_study.report.tables import markdown_table
    if summary.empty:
        return ["No row has two seeds: nothing to hold out."]

    shown = pd.DataFrame({
        "prior": summary["prior"], "picks (held-out seed 0, 1, ...)": summary["picks"],
        "held-out gFID": [("–" if pd.isna(r.gfid_mean) else f"{r.gfid_mean:.1f}"
                           + ("" if pd.isna(r.gfid_lo) else f" [{r.gfid_lo:.1f}, {r.gfid_hi:.1f}]"))
                          for r in summary.itertuples()],
        "folds": summary["folds"],
        "in-sample matched gFID": ["–" if pd.isna(x) else f"{x:.1f}" for x in summary["insample_gfid"]],
        "optimism": ["–" if pd.isna(x) else f"{x:+.1f}" for x in summary["optimism"]]})
    lines = ["Each seed held out in turn: the matched rule (mean PSNR at or above the floor, lowest mean gFID) "
             "picks on the other seeds, and the pick is scored on the held-out seed. The in-sample matched gFID "
             "is the minimum of noisy means over the same seeds, so it flatters a row; optimism = held-out "
             "mean - in-sample. Interval: Student t over the scored folds.", "", markdown_table(shown), ""]
    for r in pairs.itertuples():
        if pd.isna(r.diff):
            continue
        iv = "" if pd.isna(r.lo) else f" [{r.lo:+.1f}, {r.hi:+.1f}]"
        lines.append(f"- {r.a} - {r.b}, paired by held-out seed: {r.diff:+.1f}{iv} over {r.seeds} seed(s), "
                     + ("**resolved**" if r.resolved else "not resolved"))
    return lines
