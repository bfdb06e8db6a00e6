"""Training curves from each stage's `metrics.jsonl` (from the store, else the row's archive
`rows/<row>/curves/<stage>.jsonl`), against training step, one line per row.

- Fig. 8: stage-2 gFID against step (`eval/gfid_curve`), or the flow-matching loss when no row
  logged a curve (`generator.eval_every = 0`);
- one figure per stage, one panel per metric key the stage logs (`STAGE_CURVES`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from matplotlib.figure import Figure

from dmvae_study.report.stats import base_row
from dmvae_study.report.study import Study, StudyRow
from dmvae_study.store import atomic_write_bytes, read_jsonl

DPI = 110
CURVE_FIGSIZE = (7.0, 4.2)  # inches: the single-panel step curve (Fig. 8)
PANEL_IN = (3.4, 2.6)       # inches per panel of a stage's figure
LEGEND_IN = 0.6             # inches of the shared row legend under a stage's panels
PANELS_PER_LINE = 3
LOG_Y_SPAN = 100.0          # a panel whose positive values span more than this factor gets a log y axis
STAGE_CURVES: dict[str, tuple[str, ...]] = {  # stage -> metric keys drawn, one panel each, in this order
    "tokenizer": ("loss/rec", "loss/l1", "loss/lpips", "loss/gan_g", "loss/disc", "loss/kl", "loss/vf"),
    "teacher": ("loss/fm",),
    "dmd": ("loss/dm", "loss/fake", "loss/rec", "match/swd"),
    "refine": ("loss/rec",),
    "generator": ("loss/fm", "eval/gfid_curve"),
}
STAGE_TITLES = {
    "tokenizer": "Tokenizer: reconstruction and GAN terms",
    "teacher": "Teacher: flow matching on the reference set",
    "dmd": "DMD: distribution matching of the latents to the reference set",
    "refine": "Decoder refinement: reconstruction",
    "generator": "Stage 2: flow matching on the latents, and its gFID",
}
METRIC_LABELS = {
    "loss/rec": "reconstruction loss (total)", "loss/l1": "L1", "loss/lpips": "LPIPS", "loss/gan_g": "GAN, generator",
    "loss/disc": "discriminator", "loss/kl": "KL", "loss/vf": "VF alignment", "loss/fm": "flow-matching loss",
    "loss/dm": "DM loss", "loss/fake": "fake-score flow matching", "eval/gfid_curve": "gFID",
    "match/swd": "sliced Wasserstein to reference\n(one batch per log step)",
}


def read_metrics(path: Path | None) -> pd.DataFrame:
    """A stage's `metrics.jsonl` as a frame sorted by step; a resumed run's repeated steps keep the
    last record; a torn last line (crash mid-write) is skipped."""
    if path is None or not path.exists():
        return pd.DataFrame()
    df = pd.DataFrame.from_records(read_jsonl(path))
    if df.empty or "step" not in df:
        return pd.DataFrame()
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


@dataclass
class Curve:
    """One line: a stage's metrics log and the rows it belongs to (several when they share the artifact)."""

    rows: list[str]
    log: pd.DataFrame
    style: dict[str, Any]  # matplotlib colour and line style of its first row
    baseline: bool

    @property
    def label(self) -> str:
        names = ", ".join(self.rows[:3]) + (f" +{len(self.rows) - 3}" if len(self.rows) > 3 else "")
        return f"{names} (baseline)" if self.baseline else names

    def has(self, key: str) -> bool:
        return key in self.log and bool(self.log[key].notna().any())


def row_styles(rows: Sequence[StudyRow]) -> dict[str, dict[str, Any]]:
    """One colour per row (the seeds `<row>-s<k>` of a row share it), stable across figures; baselines dashed."""
    import matplotlib
    bases = list(dict.fromkeys(base_row(r.name) for r in rows))
    cmap = matplotlib.colormaps["tab10" if len(bases) <= 10 else "tab20"]
    return {r.name: {"color": cmap(bases.index(base_row(r.name)) % cmap.N), "ls": "--" if r.is_baseline else "-"}
            for r in rows}


def stage_curves(study: Study, stage: str) -> list[Curve]:
    """One curve per distinct `metrics.jsonl` of `stage`: rows sharing the stage's artifact (ablation
    rows reusing one teacher) make one line naming them all, not identical lines drawn over each other."""
    rows = study.ordered_rows()
    styles = row_styles(rows)
    groups: dict[Path, list[StudyRow]] = {}  # the artifact folder the manifest names -> its rows
    logs: dict[Path, Path] = {}  # the artifact folder -> its log: from the store, else a row's archive
    for r in rows:
        p = r.artifact(stage, "metrics.jsonl") or r.archived(f"curves/{stage}.jsonl")
        if p is not None:
            key = r.artifacts.get(stage, p)
            groups.setdefault(key, []).append(r)
            logs.setdefault(key, p)
    return [Curve([r.name for r in rs], read_metrics(logs[k]), styles[rs[0].name], all(r.is_baseline for r in rs))
            for k, rs in groups.items()]


def save_png(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue(), checksum=False)


def _draw(ax: Any, curves: Sequence[Curve], key: str, log_y: bool | None = None) -> None:
    """`key` against step, one line per curve; `log_y=None` picks a log axis for positive values
    spanning more than `LOG_Y_SPAN` (a loss falling by decades)."""
    values = []
    for c in curves:
        d = c.log[["step", key]].dropna()
        ax.plot(d["step"], d[key], marker="o" if len(d) <= 50 else None, ms=3, lw=1.5, label=c.label, **c.style)
        values += d[key].tolist()
    if log_y is None:
        log_y = bool(values) and min(values) > 0 and max(values) / min(values) > LOG_Y_SPAN
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _seed_groups(curves: Sequence[Curve]) -> dict[str, list[Curve]]:
    """Curves by row, the seeds `<row>-s<k>` of a row together (in table order)."""
    groups: dict[str, list[Curve]] = {}
    for c in curves:
        groups.setdefault(base_row(c.rows[0]), []).append(c)
    return groups


def _draw_seed_means(ax: Any, groups: dict[str, list[Curve]], key: str) -> None:
    """Per row, the mean over its seeds at each step they all logged, with a band of -+ one standard
    deviation (ddof 1) between seeds."""
    for row, cs in groups.items():
        d = pd.concat([c.log.set_index("step")[key].rename(i) for i, c in enumerate(cs)], axis=1).dropna()
        mean = d.mean(axis=1)
        sd = d.std(axis=1, ddof=1) if len(cs) > 1 else mean * 0
        label = f"{row}{' (baseline)' if cs[0].baseline else ''}: mean of {len(cs)} seed{'s' * (len(cs) > 1)}"
        ax.plot(mean.index, mean.values, marker="o", ms=3, lw=1.5, label=label, **cs[0].style)
        if len(cs) > 1:
            ax.fill_between(mean.index, (mean - sd).values, (mean + sd).values, color=cs[0].style["color"], alpha=0.18,
                            lw=0)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def plot_generator_curves(study: Study, out: Path) -> tuple[Path | None, str]:
    """Fig. 8: gFID of the stage-2 model against its training step, one line per row (or the
    flow-matching loss when no row logged `eval/gfid_curve`). Returns (png, "gfid" | "loss" | "none")."""
    logs = stage_curves(study, "generator")
    curves = [c for c in logs if c.has("eval/gfid_curve")]
    drawn = {name for c in logs for name in c.rows}
    if unlogged := [r.name for r in study.ordered_rows() if r.name not in drawn and "generator" in r.artifacts]:
        study.notes.append(f"Fig. 8 and the stage curves: no generator log for row(s) {', '.join(unlogged)} "
                           "(not on disk, not archived under rows/<row>/curves).")
    fig = Figure(figsize=CURVE_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    if curves:
        lacking = [name for c in logs if not c.has("eval/gfid_curve") for name in c.rows]
        if lacking:
            study.notes.append(f"No gFID curve logged for row(s) {', '.join(lacking)} (generator.eval_every = 0).")
        n = next((int(c.log["eval/gfid_curve_n"].dropna().iloc[-1]) for c in curves if c.has("eval/gfid_curve_n")),
                 None)
        seeds = _seed_groups(curves)
        if any(len(g) > 1 for g in seeds.values()):
            _draw_seed_means(ax, seeds, "eval/gfid_curve")
        else:
            _draw(ax, curves, "eval/gfid_curve", log_y=False)
        ax.set(title=f"Stage-2 convergence (Fig. 8): gFID{f'-{n}' if n else ''} vs training step",
               ylabel=f"gFID ({study.extractor})")
        path, kind = out / "fig8_gfid_vs_step.png", "gfid"
    else:
        curves = [c for c in logs if c.has("loss/fm")]
        if not curves:
            study.notes.append("No generator metrics.jsonl found: no stage-2 curve.")
            return None, "none"
        _draw(ax, curves, "loss/fm", log_y=True)
        ax.set(title="Stage-2 flow-matching loss vs step\n(no gFID curve logged: generator.eval_every = 0)",
               ylabel="flow-matching loss")
        path, kind = out / "fig8_fm_loss_vs_step.png", "loss"
    ax.legend(fontsize=8, ncol=2 if len(curves) > 6 else 1)
    return save_png(fig, path), kind


def stage_grid(n_panels: int) -> tuple[int, int]:
    """(lines, columns) of a stage's panels: at most `PANELS_PER_LINE` a line, lines filled evenly (4 -> 2 x 2)."""
    lines = math.ceil(n_panels / PANELS_PER_LINE)
    return lines, math.ceil(n_panels / lines)


def stage_figsize(n_panels: int) -> tuple[float, float]:
    """Inches of a stage's figure: its panel grid plus the legend band, at least two panels wide (a one-panel
    figure's title and four-column legend are wider than one panel and were cut at its edges)."""
    lines, cols = stage_grid(n_panels)
    return max(cols, 2) * PANEL_IN[0], lines * PANEL_IN[1] + LEGEND_IN


def plot_stage(study: Study, out: Path, stage: str) -> Path | None:
    """`curves_<stage>.png`: one panel per key of `STAGE_CURVES[stage]` that some row logged, one
    line per row; None when no row logged any of them."""
    curves = stage_curves(study, stage)
    keys = [k for k in STAGE_CURVES[stage] if any(c.has(k) for c in curves)]
    if not keys:
        if curves:
            study.notes.append(f"Stage {stage}: its metrics.jsonl logs none of {', '.join(STAGE_CURVES[stage])}.")
        return None
    fig = Figure(figsize=stage_figsize(len(keys)), layout="constrained")
    axes = fig.subplots(*stage_grid(len(keys)), squeeze=False).flatten()
    for ax, key in zip(axes, keys):
        _draw(ax, [c for c in curves if c.has(key)], key)
        ax.set_title(key, fontsize=9, family="monospace")
        ax.set_ylabel(METRIC_LABELS.get(key, key), fontsize=8)
        ax.xaxis.label.set_size(8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], lw=1.5, label=c.label, **c.style) for c in curves]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(f"{STAGE_TITLES.get(stage, stage)} (stage {stage})", fontsize=10)
    return save_png(fig, out / f"curves_{stage}.png")


def plot_stages(study: Study, out: Path) -> dict[str, Path]:
    """Every stage of `STAGE_CURVES` that some row logged: stage -> `curves_<stage>.png`."""
    figs = {stage: plot_stage(study, out, stage) for stage in STAGE_CURVES}
    return {stage: p for stage, p in figs.items() if p is not None}
