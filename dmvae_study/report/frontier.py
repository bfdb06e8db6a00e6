"""The frontier report: each prior's reconstruction-generation trade-off over its DM weight, and a fair
("matched") cross-prior comparison.

    python -m dmvae_study.report.frontier results/frontier-smoke [--psnr-margin 1.0] [--out DIR]

(`python -m dmvae_study.report DIR` builds it too when DIR holds a `frontier.csv`.)

Table 1 of the paper fixes the DM weight by a rule (10 for data-derived priors, 1 for synthetic ones)
while Table 2 shows the weight moves PSNR and gFID more than the gaps between priors: a prior can look
better only because its weight sits elsewhere on its own trade-off. `studies/frontier.py` sweeps the
weight per prior (the baselines sweep their own knob: the beta-VAE's KL weight, VA-VAE's VF weight);
this report reads the rows back and writes into `<study>/report/`:

- `frontier_summary.csv`: per (prior, knob value) the seeds, and mean, std and 95% Student-t interval of
  the mean of PSNR, rFID and gFID (`dmvae_study.report.stats.seed_summary`), and whether the point is on
  the prior's Pareto front (higher PSNR, lower gFID);
- `frontier_tradeoff.png`: per prior, PSNR and rFID against gFID over the weights, with +-1 standard error
  over seeds as error bars (the tables keep the 95% intervals);
- `frontier_pareto.png`: every prior's Pareto front in one plot;
- `matched.csv` / `matched.md`: every prior's best gFID subject to mean PSNR >= the beta-VAE baseline's
  mean PSNR (at its default KL weight, else the nearest swept one) minus `--psnr-margin` dB (default 1),
  with the intervals; a prior with no weight meeting the constraint is listed with none;
- `ranking.csv`: the matched comparison against the heuristic one (Table 1's rule: DM weight 10 for
  data-derived priors, 1 for synthetic ones, the baselines at the preset's own knob value): per pair of
  rows, the gFID difference at the matched picks and at the heuristic points with Welch 95% intervals over
  seeds and paired by seed, whether each is resolved (the interval excludes 0), and whether the two
  comparisons order the pair the same way; the page says in words which pairs the fair comparison ranks
  differently;
- `against_heuristic.csv`: every point against its own prior's heuristic point (`report.points`): per metric
  (gFID, PSNR) the difference with its Welch interval and paired by seed, resolved or not; the page shows it
  with a "Points" table (each point's seeds, mean [interval] per metric, matching distance, wall minutes);
- `held_out.csv`: the matched picks out of sample (`report.heldout`): each seed held out in turn, the pick
  made on the other seeds by the matched rule and scored on the held-out seed; the page gives each row's
  held-out mean against its in-sample matched gFID (the pick's optimism) and the pairs paired by held-out seed;
- `asha_replay.csv`: the study's early-stopping rule replayed on the DMD curves of rows that ran in full
  (`--no-asha`): which weights ASHA would have kept at each rung, with the signal averaged over the last
  report and over the last three (`dmvae_study.asha.replay`), and whether the kept weights include each
  seed's best-gFID weight and the matched table's pick.

Rows are labelled `<prior>@<knob>=<value>` (seeds: `-s<seed>`); `row_label` / `parse_label` are the
one definition of that format (the study writes it, the report reads it).
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dmvae_study.report.heldout import held_out_folds, held_out_pairs, held_out_summary, held_out_text
from dmvae_study.report.points import against_heuristic, against_text, points_table
from dmvae_study.report.ranking import ranking, ranking_text
from dmvae_study.report.replay import asha_replay, replay_text
from dmvae_study.report.stats import base_row, seed_summary
from dmvae_study.store import atomic_write_bytes, atomic_write_text

KNOBS: dict[str, str] = {  # short knob name -> the config field a frontier row sweeps
    "dm": "dmd.dm_weight",             # DMVAE priors: weight of the DM loss (Eq. 6)
    "kl": "baseline.kl_weight",        # `vae` row: beta of the beta-VAE
    "vf": "baseline.vavae_weight",     # `vavae` row: VA-VAE's VF (alignment) loss weight
}
BASELINE_KNOB = {"vae": "kl", "vavae": "vf"}  # baseline row -> its knob; every prior sweeps `dm`
LABEL = re.compile(r"^(?P<prior>[^@]+)@(?P<knob>[a-z]+)=(?P<value>[^=@]+)$")
FRONTIER_METRICS = ("psnr", "rfid", "gfid")
PSNR_REFERENCE = "vae"  # the matched table's PSNR floor comes from this row (the LDM-style beta-VAE)


def knob_of(prior: str) -> str:
    return BASELINE_KNOB.get(prior, "dm")


def row_label(prior: str, value: float, knob: str | None = None) -> str:
    """`dinov2@dm=0.3`, `vae@kl=1e-06`: the frontier row of one prior at one knob value."""
    return f"{prior}@{knob or knob_of(prior)}={value:g}"


def parse_label(label: str) -> tuple[str, str, float] | None:
    """`dinov2@dm=0.3-s1` -> ("dinov2", "dm", 0.3); None for a label of another study."""
    m = LABEL.match(base_row(label))
    return (m["prior"], m["knob"], float(m["value"])) if m else None


def frontier_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The study table with `prior`, `knob`, `weight` and `point` (the label without seed) from its row
    labels; rows of other studies are dropped."""
    parsed = table["row"].map(lambda r: parse_label(str(r)))
    df = table[parsed.notna()].copy()
    parsed = parsed[parsed.notna()]
    df["prior"] = [p[0] for p in parsed]
    df["knob"] = [p[1] for p in parsed]
    df["weight"] = [p[2] for p in parsed]
    df["point"] = df["row"].map(lambda r: base_row(str(r)))
    if "status" not in df:
        df["status"] = "ok"
    return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per (prior, knob value): `n` finished seeds, `stopped` (seeds ASHA stopped), and per metric of
    `FRONTIER_METRICS` the mean, std and 95% Student-t interval of the mean over seeds; `pareto` marks the
    prior's non-dominated points (PSNR higher, gFID lower). Sorted by prior, then weight."""
    df = frontier_frame(df) if "point" not in df else df
    ok = df[df["status"] == "ok"]
    stats = seed_summary(ok.assign(row=ok["point"]), FRONTIER_METRICS, min_seeds=1) if len(ok) else None
    points = df.drop_duplicates("point")[["point", "prior", "knob", "weight"]]
    out = points.merge(stats.rename(columns={"row": "point"}), on="point", how="left") if stats is not None \
        else points.assign(n=0)
    out["n"] = out["n"].fillna(0).astype(int)
    out["stopped"] = out["point"].map(df[df["status"] == "stopped"].groupby("point").size()).fillna(0).astype(int)
    out = out.sort_values(["prior", "weight"], kind="stable").reset_index(drop=True)
    out["pareto"] = False
    for _, g in out[out["n"] > 0].groupby("prior", sort=False):
        for i, r in g.iterrows():
            dominated = ((g["psnr_mean"] >= r["psnr_mean"]) & (g["gfid_mean"] <= r["gfid_mean"])
                         & ((g["psnr_mean"] > r["psnr_mean"]) | (g["gfid_mean"] < r["gfid_mean"]))).any()
            out.loc[i, "pareto"] = not dominated
    return out


def psnr_floor(summary: pd.DataFrame, margin_db: float = 1.0, reference: str = PSNR_REFERENCE,
               reference_weight: float | None = None) -> tuple[float, str]:
    """The matched table's constraint: mean PSNR of `reference` at `reference_weight` (or, when that was
    not swept or is None, the swept value nearest to it in log scale; None: the middle one) minus
    `margin_db`. Returns (floor, a sentence saying where it came from); NaN when the reference row has
    no finished point."""
    ref = summary[(summary["prior"] == reference) & (summary["n"] > 0)]
    if ref.empty:
        return math.nan, f"no finished `{reference}` point: no PSNR constraint"
    logw = np.log(ref["weight"].to_numpy(float))
    i = int(np.argmin(np.abs(logw - math.log(reference_weight)))) if reference_weight else len(ref) // 2
    r = ref.iloc[i]
    floor = float(r["psnr_mean"]) - margin_db
    return floor, (f"PSNR >= {floor:.3g} dB: `{r['point']}` mean PSNR {r['psnr_mean']:.3g} dB ({int(r['n'])} "
                   f"seed(s)) minus {margin_db:g} dB")


def matched_table(summary: pd.DataFrame, floor: float) -> pd.DataFrame:
    """Per prior (and baseline), the knob value with the lowest mean gFID among those with mean PSNR >=
    `floor` (every finished value when `floor` is NaN), with its intervals; `feasible` counts the values
    meeting the constraint, and a prior with none gets an empty line. Sorted by mean gFID."""
    cols = ["point", "knob", "weight", "n"] + [f"{m}_{s}" for m in ("gfid", "psnr", "rfid")
                                               for s in ("mean", "lo", "hi")]
    records = []
    for prior, g in summary[summary["n"] > 0].groupby("prior", sort=False):
        ok = g if math.isnan(floor) else g[g["psnr_mean"] >= floor]
        rec = {"prior": prior, "feasible": len(ok), "finished": len(g)}
        if len(ok):
            best = ok.loc[ok["gfid_mean"].idxmin()]
            rec.update({c: best[c] for c in cols})
        else:
            rec.update({c: (g["knob"].iloc[0] if c == "knob" else None) for c in cols})
        records.append(rec)
    out = pd.DataFrame.from_records(records)
    if out.empty:
        return out
    out = out[["prior"] + cols + ["feasible", "finished"]].rename(columns={"n": "seeds"})
    return out.sort_values("gfid_mean", na_position="last", kind="stable").reset_index(drop=True)


def display_matched(matched: pd.DataFrame) -> pd.DataFrame:
    """`mean [lo, hi]` cells for the Markdown table."""
    def cell(r: pd.Series, m: str) -> str:
        if r[f"{m}_mean"] is None or pd.isna(r[f"{m}_mean"]):
            return "–"
        lo, hi = r[f"{m}_lo"], r[f"{m}_hi"]
        return f"{r[f'{m}_mean']:.3g}" + ("" if pd.isna(lo) else f" [{lo:.3g}, {hi:.3g}]")
    return pd.DataFrame({
        "prior": matched["prior"], "knob": [f"{KNOBS[k]}" for k in matched["knob"]],
        "value": [("–" if pd.isna(v) else f"{v:g}") for v in matched["weight"]],
        "seeds": [("–" if pd.isna(v) else int(v)) for v in matched["seeds"]],
        "gFID": [cell(r, "gfid") for _, r in matched.iterrows()],
        "PSNR": [cell(r, "psnr") for _, r in matched.iterrows()],
        "rFID": [cell(r, "rfid") for _, r in matched.iterrows()],
        "feasible / finished": [f"{a} / {b}" for a, b in zip(matched["feasible"], matched["finished"])]})


# ---- matched against the heuristic ----------------------------------------------------------------------

def heuristic_weights(priors: list[str], baseline: dict[str, float] | None = None) -> dict[str, float | None]:
    """Table 1's point of each row: a prior at `priors.DM_WEIGHT[kind]` (Sec. 4: 10 data-derived, 1
    synthetic), a baseline at its knob's value in `baseline` (`{"vae": kl_weight, "vavae": vavae_weight}`,
    the preset's defaults; None when not given). An unknown prior gets None."""
    from priors import DM_WEIGHT, UnknownPriorError, get
    out: dict[str, float | None] = {}
    for p in priors:
        if p in BASELINE_KNOB:
            out[p] = (baseline or {}).get(p)
            continue
        try:
            out[p] = DM_WEIGHT[get(p).kind]
        except UnknownPriorError:
            out[p] = None
    return out


# ---- figures ---------------------------------------------------------------------------------------------

def _err(g: pd.DataFrame, m: str) -> np.ndarray | None:
    """Error bars: +-1 standard error of the mean over seeds (std / sqrt(n)); none for a single seed, and None
    when no point has two. Not the 95% intervals of the tables: with two seeds Student's t for one degree of
    freedom (12.7) stretches those over the whole plot and hides every other point."""
    std, n = g[f"{m}_std"].to_numpy(float), g["n"].to_numpy(float)
    se = std / np.sqrt(np.maximum(n, 1.0))
    if np.isnan(se).all():
        return None
    return np.nan_to_num(se, nan=0.0)


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue(), checksum=False)


def plot_tradeoff(summary: pd.DataFrame, path: Path) -> Path:
    """Two panels, PSNR and rFID against gFID: one line per prior through its knob values (in weight
    order, each point labelled with its value), +-1 standard error over seeds as error bars; baselines dashed."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11.0, 4.4))
    axes = fig.subplots(1, 2)
    done = summary[summary["n"] > 0]
    for prior, g in done.groupby("prior", sort=False):
        style = "--" if prior in BASELINE_KNOB else "-"
        for ax, m in zip(axes, ("psnr", "rfid")):
            line = ax.errorbar(g["gfid_mean"], g[f"{m}_mean"], xerr=_err(g, "gfid"), yerr=_err(g, m), fmt="o" + style,
                               ms=4, capsize=2, lw=1.2, label=prior)
            for _, r in g.iterrows():
                ax.annotate(f"{r['weight']:g}", (r["gfid_mean"], r[f"{m}_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=line[0].get_color())
    for ax, m in zip(axes, ("PSNR (dB), higher is better", "rFID, lower is better")):
        ax.set_xlabel("gFID, lower is better")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0].set_title("reconstruction vs generation over the DM weight")
    axes[1].set_title("baselines dashed (own knob); bars: +-1 s.e. over seeds", fontsize=10)
    axes[1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_pareto(summary: pd.DataFrame, path: Path, floor: float = math.nan) -> Path:
    """Every prior's Pareto front (PSNR up, gFID down) in one plot; dominated points faded; the matched
    table's PSNR floor as a dotted line."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    done = summary[summary["n"] > 0]
    for prior, g in done.groupby("prior", sort=False):
        front = g[g["pareto"]].sort_values("psnr_mean")
        style = "--" if prior in BASELINE_KNOB else "-"
        line = ax.plot(front["psnr_mean"], front["gfid_mean"], "o" + style, ms=5, lw=1.4, label=prior)
        rest = g[~g["pareto"]]
        ax.plot(rest["psnr_mean"], rest["gfid_mean"], "o", ms=4, alpha=0.3, color=line[0].get_color())
    if not math.isnan(floor):
        ax.axvline(floor, ls=":", color="k", lw=1, label="PSNR floor (matched table)")
    ax.set_xlabel("PSNR (dB), higher is better")
    ax.set_ylabel("gFID, lower is better")
    ax.set_title("Pareto front of each prior over its DM weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


# ---- the report -----------------------------------------------------------------------------------------

def load_frontier_table(root: Path) -> pd.DataFrame:
    """The study's rows (its `frontier.csv`, merged with every part's manifest and stopped marker)."""
    from dmvae_study.report.study import load_study
    return load_study(root).table


def baseline_defaults(root: Path) -> dict[str, float]:
    """The baselines' default knob values (`{"vae": kl_weight, "vavae": vavae_weight}`) of the preset the
    study ran (`frontier-<preset>`); empty when the folder name does not say."""
    from dmvae_study.presets import PRESETS, preset
    name = next((p for p in PRESETS if root.name.endswith(f"-{p}")), None)
    if not name:
        return {}
    b = preset(name).baseline
    return {"vae": b.kl_weight, "vavae": b.vavae_weight}


def default_reference_weight(root: Path) -> float | None:
    """The beta-VAE's default KL weight: from the preset the study ran (`frontier-<preset>`), else None."""
    return baseline_defaults(root).get("vae")


def notice_lines(root: Path) -> list[str]:
    """The page's opening notes (none: no lines): trials whose DMD encoder had stochastic depth, and seeds whose
    trials started from different tokenizer weights under one artifact key."""
    from dmvae_study.report.study import drop_path_notice, load_manifests, shared_weights_notice
    rows = list(load_manifests(root).values())
    notices = (drop_path_notice(rows, name_rows=False), shared_weights_notice(rows, name_rows=False))
    return [line for n in notices if n for line in (n, "")]


def build_frontier(results_dir: str | Path, out_dir: str | Path | None = None, psnr_margin: float = 1.0,
                   reference: str = PSNR_REFERENCE, reference_weight: float | None = None,
                   replay_eta: float = 3.0) -> Path:
    """Write the frontier tables and figures into `out_dir` (default `<results_dir>/report/`); returns the
    path of `frontier.md`, the page that links them."""
    from dmvae_study.report.tables import markdown_table
    root = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = load_frontier_table(root)
    if "row" not in table or table.empty or frontier_frame(table).empty:
        raise FileNotFoundError(f"{root}: no frontier rows (<prior>@<knob>=<value>) in its table")
    summary = summarise(frontier_frame(table))
    atomic_write_text(out / "frontier_summary.csv", summary.to_csv(index=False))
    ref_w = reference_weight if reference_weight is not None else default_reference_weight(root)
    floor, why = psnr_floor(summary, psnr_margin, reference, ref_w)
    matched = matched_table(summary, floor)
    atomic_write_text(out / "matched.csv", matched.to_csv(index=False))
    shown = markdown_table(display_matched(matched)) if len(matched) else "(no finished point)"
    caption = (f"Matched comparison: each row's best mean gFID subject to {why}. Cells: mean [95% interval of "
               f"the mean over seeds, Student t].")
    atomic_write_text(out / "matched.md", f"{caption}\n\n{shown}\n")
    frame = frontier_frame(table)
    heuristic = heuristic_weights(list(summary["prior"].unique()), baseline_defaults(root))
    ranked = ranking(frame, matched, heuristic)
    atomic_write_text(out / "ranking.csv", ranked.to_csv(index=False))
    folds = held_out_folds(frame, floor)
    atomic_write_text(out / "held_out.csv", folds.to_csv(index=False))
    held = held_out_summary(folds, matched)
    held_pairs = held_out_pairs(folds, list(held["prior"]))
    against = against_heuristic(frame, heuristic)
    atomic_write_text(out / "against_heuristic.csv", against.to_csv(index=False))
    replayed = asha_replay(root, frame, replay_eta)
    atomic_write_text(out / "asha_replay.csv", replayed.to_csv(index=False))
    plot_tradeoff(summary, out / "frontier_tradeoff.png")
    plot_pareto(summary, out / "frontier_pareto.png", floor)
    stopped = int(summary["stopped"].sum())
    page = [f"# Frontier: {root.name}", "", *notice_lines(root), "## Matched comparison", "", caption, "", shown, "",
            "Files: [matched.csv](matched.csv) · [frontier_summary.csv](frontier_summary.csv)", "",
            "## Matched against the heuristic (Table 1's weights)", ""]
    page += ranking_text(ranked, matched, frame, heuristic) + ["", "File: [ranking.csv](ranking.csv)", ""]
    page += ["## Matched picks out of sample (leave one seed out)", ""] + held_out_text(held, held_pairs) + [
        "", "File: [held_out.csv](held_out.csv)", ""]
    page += ["## Points", "", "Every point with a finished seed: mean [95% interval of the mean over seeds, "
             "Student t]; match SW: the matching distance after DMD (sliced Wasserstein to the prior's reference), its range "
             "over the seeds; marks: T1 Table 1's point, P on the prior's Pareto front.", "",
             markdown_table(points_table(summary, frame, heuristic)), "",
             "File: [frontier_summary.csv](frontier_summary.csv)", "",
             "## Each point against its prior's Table 1 point", ""]
    page += against_text(against) + ["", "File: [against_heuristic.csv](against_heuristic.csv)", ""]
    page += ["## Trade-off per prior", "", "![trade-off](frontier_tradeoff.png)", "",
             "## Pareto fronts", "", "![pareto](frontier_pareto.png)", "",
             (f"{len(summary)} points, {int((summary['n'] > 0).sum())} with a finished seed; {stopped} trial(s) "
              f"stopped early by ASHA (not in the means)."), "",
             "## ASHA replay", ""] + replay_text(replayed, matched, replay_eta) + [
             "", "File: [asha_replay.csv](asha_replay.csv)"]
    return atomic_write_text(out / "frontier.md", "\n".join(page) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.report.frontier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", help="a frontier study's results folder, e.g. results/frontier-smoke")
    ap.add_argument("--out", default=None, help="report folder (default: RESULTS_DIR/report)")
    ap.add_argument("--psnr-margin", type=float, default=1.0,
                    help="matched table: PSNR floor = the beta-VAE's mean PSNR minus this many dB (default 1)")
    ap.add_argument("--reference", default=PSNR_REFERENCE, help="row whose mean PSNR sets the floor (default vae)")
    ap.add_argument("--reference-weight", type=float, default=None,
                    help="its knob value (default: the preset's baseline.kl_weight, else the middle swept value)")
    ap.add_argument("--replay-eta", type=float, default=3.0,
                    help="ASHA replay on rows that ran in full: its reduction factor (default 3, the study's)")
    args = ap.parse_args(argv)
    if args.replay_eta <= 1:
        ap.error(f"--replay-eta {args.replay_eta:g}: must be > 1, e.g. 3")
    try:
        path = build_frontier(args.results_dir, args.out, args.psnr_margin, args.reference, args.reference_weight,
                              args.replay_eta)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}, matched.csv/.md, ranking.csv, held_out.csv, against_heuristic.csv, frontier_summary.csv, "
          f"asha_replay.csv, frontier_tradeoff.png, frontier_pareto.png")
    return 0


__all__ = ["BASELINE_KNOB", "KNOBS", "asha_replay", "build_frontier", "display_matched", "frontier_frame",
           "heuristic_weights", "knob_of", "matched_table", "parse_label", "plot_pareto", "plot_tradeoff", "psnr_floor",
           "ranking", "row_label", "summarise"]


if __name__ == "__main__":
    sys.exit(main())
