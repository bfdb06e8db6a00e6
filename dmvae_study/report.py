"""Study report: every table and figure rebuilt from a study's results folder alone (no training).

    python -m dmvae_study.report results/table1-smoke [--out DIR] [--max-points 1000]

Reads `<study>/<stem>.csv` (`table1` or `ablations`; rebuilt from `rows/*.json` when missing), the
row manifests `rows/<row>.json` and the artifact folders they name, and writes into
`<study>/report/` (or `--out`):

- `<stem>.md`, `<stem>.tex`, `<stem>.csv`: the study table (paper Table 1 / Table 2 columns);
- `fig8_gfid_vs_step.png`: stage-2 gFID against training step per row (paper Fig. 8), from the
  generator's `eval/gfid_curve` log; `fig8_fm_loss_vs_step.png` (flow-matching loss) when no row
  logged a curve (`generator.eval_every = 0`);
- `dmd_match_swd.png`: sliced Wasserstein distance between latents and reference set during DMD;
- `fig4_tsne.png`: t-SNE of each row's latents next to its reference set (paper Fig. 4);
- `grids/<row>_samples.png`, `grids/<row>_reconstructions.png`: the eval stage's image grids;
- `report.md`, written last, embedding all of the above with relative links.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from dmvae_study.store import atomic_write_bytes, atomic_write_text, load_torch

STUDY_STEMS = ("table1", "ablations")  # the study tables `studies/*.py` write
RESULT_COLUMNS = ("row", "prior", "rfid", "psnr", "gfid", "is", "extractor", "gfid_samples", "matching_swd",
                  "diversity", "latent_diversity", "wall_s", "gpu_hours", "random_init")
TABLE_COLUMNS = {  # result column -> displayed name (paper Table 1 names first)
    "row": "row", "prior": "prior", "rfid": "rFID", "psnr": "PSNR", "gfid": "gFID", "is": "IS",
    "matching_swd": "match SW", "wall_s": "wall s", "gpu_hours": "GPU-h", "random_init": "random-init",
}
DPI = 110
CURVE_FIGSIZE = (7.0, 4.2)  # inches: the step curves (Fig. 8, DMD matching)
TSNE_PANEL_IN = 3.4         # inches per t-SNE panel (square)
TSNE_LEGEND_IN = 0.7        # inches of the shared class legend under the t-SNE grid
TSNE_PCA_DIM = 50           # usual t-SNE preprocessing: PCA to 50 dims first
BIG_LATENTS_BYTES = 512 << 20  # above this, latents are memory-mapped instead of checksum-verified


# ---- study contents ------------------------------------------------------------------------------
@dataclass
class StudyRow:
    """One row's manifest `rows/<row>.json`: resolved config, stage summaries, artifact folders."""

    name: str
    prior: str
    config: dict[str, Any]
    summaries: dict[str, Any]
    artifacts: dict[str, Path]  # stage -> absolute artifact folder
    wall_s: float | None = None

    @property
    def is_baseline(self) -> bool:
        """Baselines (vae, vavae) have no reference set and no DMD stage."""
        return "reference" not in self.artifacts

    def artifact(self, stage: str, file: str | None = None) -> Path | None:
        """The stage's folder (or a file in it) when it exists on disk, else None."""
        p = self.artifacts.get(stage)
        if p is None:
            return None
        p = p / file if file else p
        return p if p.exists() else None


@dataclass
class Study:
    """A results folder: its table, its row manifests, and what the report found missing."""

    root: Path
    stem: str
    table: pd.DataFrame
    rows: dict[str, StudyRow]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def preset(self) -> str:
        from dmvae_study.config import PRESETS
        name = next((r.config.get("run", {}).get("name") for r in self.rows.values()), None) or self.name
        return next((p for p in PRESETS if name.endswith(f"-{p}")), "?")

    @property
    def extractor(self) -> str:
        col = self.table.get("extractor")
        return str(col.dropna().iloc[0]) if col is not None and col.notna().any() else "?"

    @property
    def gfid_samples(self) -> int:
        col = self.table.get("gfid_samples")
        return int(col.dropna().iloc[0]) if col is not None and col.notna().any() else 0

    def ordered_rows(self) -> list[StudyRow]:
        """Manifests in table order, then any row the table lacks."""
        order = [r for r in self.table.get("row", pd.Series(dtype=str)).tolist() if r in self.rows]
        return [self.rows[r] for r in order] + [v for k, v in sorted(self.rows.items()) if k not in order]


def load_manifests(root: Path) -> dict[str, StudyRow]:
    """`rows/*.json` -> row name -> StudyRow (artifact paths resolved against the study folder)."""
    rows = {}
    for p in sorted((root / "rows").glob("*.json")):
        m = json.loads(p.read_text())
        rows[m["row"]] = StudyRow(name=m["row"], prior=m.get("prior", m["row"]), config=m.get("config", {}),
                                  summaries=m.get("summaries", {}),
                                  artifacts={s: (root / a).resolve() for s, a in m.get("artifacts", {}).items()},
                                  wall_s=m.get("wall_s"))
    return rows


def row_result(row: StudyRow) -> dict[str, Any]:
    """A table row from a manifest's stage summaries (the same record `studies/common.flatten_row` reports)."""
    ev = row.summaries.get("eval") or {}
    tag = ev.get("extractor", row.config.get("eval", {}).get("extractor"))
    run = row.config.get("run", {})
    wall = row.wall_s
    gpus = run.get("num_workers", 1) if run.get("use_gpu") else 0
    return {"row": row.name, "prior": row.prior, "rfid": ev.get(f"rfid_{tag}"), "psnr": ev.get("psnr"),
            "gfid": ev.get(f"gfid_{tag}"), "is": ev.get(f"is_{tag}"), "extractor": tag,
            "gfid_samples": ev.get("gfid_samples"), "matching_swd": (row.summaries.get("dmd") or {}).get("match/swd"),
            "diversity": ev.get(f"diversity_{tag}"), "latent_diversity": ev.get("latent_diversity"),
            "wall_s": wall, "gpu_hours": (wall or 0.0) * gpus / 3600.0, "random_init": bool(ev.get("random_init"))}


def load_study(results_dir: str | Path) -> Study:
    """Read a study folder: its `<stem>.csv` (else rebuilt from the row manifests) and manifests."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no study folder at {root}")
    rows = load_manifests(root)
    notes: list[str] = []
    csv = next((root / f"{s}.csv" for s in STUDY_STEMS if (root / f"{s}.csv").exists()), None)
    if csv is not None:
        stem, table = csv.stem, pd.read_csv(csv)
    elif rows:
        stem = next((s for s in STUDY_STEMS if root.name.startswith(s)), "table")
        ordered = sorted(rows.values(), key=lambda r: (not r.is_baseline, r.name))  # baselines first, as studies do
        table = pd.DataFrame.from_records([row_result(r) for r in ordered])
        notes.append(f"No {'/'.join(f'{s}.csv' for s in STUDY_STEMS)} found: the table was rebuilt from rows/*.json.")
    else:
        raise FileNotFoundError(f"{root} has neither a study table ({', '.join(f'{s}.csv' for s in STUDY_STEMS)}) "
                                f"nor row manifests (rows/*.json): is it a study results folder?")
    table = table[[c for c in RESULT_COLUMNS if c in table.columns]]  # drop Tune's bookkeeping columns
    if not rows:
        notes.append("No row manifests (rows/*.json, written by each finished study row): the figures need them, "
                     "so only the table is reported.")
    return Study(root=root, stem=stem, table=table, rows=rows, notes=notes)


# ---- tables --------------------------------------------------------------------------------------
def random_init_rows(df: pd.DataFrame) -> list[str]:
    """Rows whose `random_init` is true (bool, or "True" read back from text; a missing value is not)."""
    if "random_init" not in df:
        return []
    flag = df["random_init"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    return df.loc[flag, "row"].astype(str).tolist() if "row" in df else ["?"] * int(flag.sum())


def display_table(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Result frame -> (frame with the paper's column names, footnote on features and random init)."""
    n = int(df["gfid_samples"].dropna().iloc[0]) if "gfid_samples" in df and df["gfid_samples"].notna().any() else 0
    gfid = f"gFID-{n // 1000}k" if n >= 1000 else f"gFID-{n}"
    show = df[[c for c in TABLE_COLUMNS if c in df.columns]].rename(columns={**TABLE_COLUMNS, "gfid": gfid})
    if "prior" in show and "row" in show and (show["prior"] == show["row"]).all():
        show = show.drop(columns="prior")  # Table 1: one row per prior, the name once is enough
    extractor = df["extractor"].dropna().iloc[0] if "extractor" in df and df["extractor"].notna().any() else "?"
    note = f"Features: {extractor}."
    if random_init_rows(df):
        note += " Rows marked random-init used randomly initialised backbones (no pretrained weights)."
    return show, note


def write_tables(study: Study, out: Path) -> str:
    """`<stem>.{csv,md,tex}` into `out`; returns the Markdown table for the report."""
    show, note = display_table(study.table)
    caption = {"table1": "Table 1", "ablations": "Table 2"}.get(study.stem, study.stem)
    caption = f"{caption} ({study.preset}): {study.name}"
    md = show.astype(object).where(show.notna(), None).to_markdown(index=False, floatfmt=".3g", missingval="–")
    atomic_write_text(out / f"{study.stem}.csv", study.table.to_csv(index=False))
    atomic_write_text(out / f"{study.stem}.md", f"{caption}\n\n{md}\n\n{note}\n")
    atomic_write_text(out / f"{study.stem}.tex", show.to_latex(index=False, float_format="%.3g", caption=caption,
                                                               na_rep="--"))
    return f"{md}\n\n{note}"


# ---- metric curves -------------------------------------------------------------------------------
def read_metrics(path: Path | None) -> pd.DataFrame:
    """A stage's `metrics.jsonl` as a frame sorted by step; a resumed run's repeated steps keep the
    last record; a torn last line (crash mid-write) is skipped."""
    if path is None or not path.exists():
        return pd.DataFrame()
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    df = pd.DataFrame.from_records(recs)
    if df.empty or "step" not in df:
        return pd.DataFrame()
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def _row_styles(rows: Sequence[StudyRow]) -> dict[str, dict[str, Any]]:
    """One colour per row, stable across figures; baselines dashed."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    return {r.name: {"color": cmap(i % cmap.N), "ls": "--" if r.is_baseline else "-",
                     "label": f"{r.name} (baseline)" if r.is_baseline else r.name} for i, r in enumerate(rows)}


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue(), checksum=False)


def _curve_figure(series: dict[str, pd.DataFrame], key: str, styles: dict[str, dict[str, Any]],
                  title: str, ylabel: str, log_y: bool = False) -> Figure:
    fig = Figure(figsize=CURVE_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    for name, df in series.items():
        d = df[["step", key]].dropna()
        ax.plot(d["step"], d[key], marker="o", ms=3, lw=1.5, **styles[name])
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(series) > 6 else 1)
    return fig


def plot_generator_curves(study: Study, out: Path) -> tuple[Path | None, str]:
    """Fig. 8: gFID of the stage-2 model against its training step, one line per row (or the
    flow-matching loss when no row logged `eval/gfid_curve`). Returns (png, what it shows)."""
    rows = study.ordered_rows()
    styles = _row_styles(rows)
    logs = {r.name: read_metrics(r.artifact("generator", "metrics.jsonl")) for r in rows}
    curves = {k: v for k, v in logs.items() if "eval/gfid_curve" in v and v["eval/gfid_curve"].notna().any()}
    if curves:
        lacking = [k for k in logs if k not in curves]
        if lacking:
            study.notes.append(f"No gFID curve logged for row(s) {', '.join(lacking)} (generator.eval_every = 0).")
        n = next((int(v["eval/gfid_curve_n"].dropna().iloc[-1]) for v in curves.values()
                  if "eval/gfid_curve_n" in v and v["eval/gfid_curve_n"].notna().any()), None)
        fig = _curve_figure(curves, "eval/gfid_curve", styles,
                            f"Stage-2 convergence (Fig. 8): gFID{f'-{n}' if n else ''} vs training step",
                            f"gFID ({study.extractor})")
        return _save(fig, out / "fig8_gfid_vs_step.png"), "gfid"
    losses = {k: v for k, v in logs.items() if "loss/fm" in v and v["loss/fm"].notna().any()}
    if not losses:
        study.notes.append("No generator metrics.jsonl found: no stage-2 curve.")
        return None, "none"
    fig = _curve_figure(losses, "loss/fm", styles,
                        "Stage-2 flow-matching loss vs step\n(no gFID curve logged: generator.eval_every = 0)",
                        "flow-matching loss", log_y=True)
    return _save(fig, out / "fig8_fm_loss_vs_step.png"), "loss"


def plot_dmd_matching(study: Study, out: Path) -> Path | None:
    """Sliced Wasserstein distance between the (projected) latents and the reference set, logged
    during the DMD stage (`match/swd`), against step, one line per prior row."""
    rows = study.ordered_rows()
    styles = _row_styles(rows)
    logs = {r.name: read_metrics(r.artifact("dmd", "metrics.jsonl")) for r in rows if not r.is_baseline}
    logs = {k: v for k, v in logs.items() if "match/swd" in v and v["match/swd"].notna().any()}
    if not logs:
        study.notes.append("No DMD `match/swd` logged (no prior rows, or their dmd metrics.jsonl is missing).")
        return None
    fig = _curve_figure(logs, "match/swd", styles, "DMD distribution matching: latents vs reference set",
                        "sliced Wasserstein distance (lower = closer)")
    return _save(fig, out / "dmd_match_swd.png")


# ---- t-SNE (Fig. 4) ------------------------------------------------------------------------------
def tsne_figsize(n_rows: int) -> tuple[float, float]:
    """Inches of the t-SNE grid: two square panels (latents, reference) per row, plus the legend band."""
    return 2 * TSNE_PANEL_IN, n_rows * TSNE_PANEL_IN + TSNE_LEGEND_IN


def select(y: torch.Tensor | None, n: int, max_points: int, max_classes: int = 20, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced subsample (paper Fig. 4: 100 samples of each of 20 random classes),
    capped at `max_points`; `max_points` random samples when unlabelled."""
    g = torch.Generator().manual_seed(seed)
    if y is None:
        return torch.randperm(n, generator=g)[:max_points].sort().values
    present = torch.unique(y)
    keep = present[torch.randperm(len(present), generator=g)[:max_classes]].sort().values
    per_class = max(max_points // max(len(keep), 1), 1)
    idx = [m[torch.randperm(len(m), generator=g)[:per_class]] for m in (torch.nonzero(y == c).flatten() for c in keep)]
    return torch.cat(idx).sort().values


def tsne_embed(x: torch.Tensor, seed: int = 0) -> np.ndarray:
    """`(M, ...)` samples, each flattened -> `(M, 2)` t-SNE coordinates (PCA to 50 dims first)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    f = x.reshape(x.shape[0], -1).double().numpy()
    if f.shape[1] > TSNE_PCA_DIM and f.shape[0] > TSNE_PCA_DIM:
        f = PCA(TSNE_PCA_DIM, random_state=seed).fit_transform(f)
    perplexity = float(min(30.0, max(2.0, (f.shape[0] - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1).fit_transform(f)


def _load_latents(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stage-2 latent cache `{"z": (N, C, h, w), "y": (N,)}`. A paper-scale cache (tens of GB)
    is memory-mapped rather than read whole to verify its checksum; only the subsample is touched."""
    if path.stat().st_size > BIG_LATENTS_BYTES:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        d = load_torch(path)
    return d["z"], d.get("y")


@dataclass
class _Embedding:
    xy: np.ndarray
    y: np.ndarray | None
    label: str  # what the colours mean: "class" or "component"
    count: int  # samples in the source set


def _embed(x: torch.Tensor, y: torch.Tensor | None, label: str, max_points: int, seed: int) -> _Embedding:
    idx = select(y, x.shape[0], max_points, seed=seed)
    return _Embedding(tsne_embed(x[idx].float(), seed), None if y is None else y[idx].numpy(), label, x.shape[0])


def _class_colours(labels: set[int]) -> Any:
    """Label -> colour, the same in every panel: tab10 for up to 10 labels (tab20's paired shades
    read as one colour), else tab20 (labels beyond 20 wrap)."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if max(labels, default=0) < 10 else "tab20"]
    return lambda k: cmap(int(k) % cmap.N)


def _panel(ax: Any, emb: _Embedding | None, title: str, colour: Any, why_missing: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if emb is None:
        ax.text(0.5, 0.5, why_missing, ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        for s in ax.spines.values():
            s.set_color("0.85")
        return
    if emb.y is None:
        ax.scatter(emb.xy[:, 0], emb.xy[:, 1], s=3, color="tab:gray", alpha=0.8)
    else:
        ax.scatter(emb.xy[:, 0], emb.xy[:, 1], s=3, c=[colour(k) for k in emb.y], alpha=0.8)
    by = "unlabelled" if emb.y is None else f"by {emb.label}"
    ax.set_title(f"{title}\n{len(emb.xy)} of {emb.count} pts, {by}", fontsize=9)


def _class_names(study: Study) -> Sequence[str] | None:
    datasets = {r.config.get("data", {}).get("dataset") for r in study.rows.values()}
    if datasets == {"fmnist"}:
        from dmvae_study.data import FMNIST_CLASSES
        return FMNIST_CLASSES
    return None


def plot_tsne(study: Study, out: Path, max_points: int = 1000, seed: int = 0) -> Path | None:
    """Fig. 4: per row, t-SNE of its stage-2 latents (left) next to its reference set (right; none
    for baselines), points coloured by class (GMM reference: by component)."""
    from dmvae_study.reference import ReferenceSet
    rows = study.ordered_rows()
    if not rows:
        return None
    cache: dict[Path, _Embedding] = {}  # ablation rows often share a reference set or a latent cache

    def latents(r: StudyRow) -> _Embedding | None:
        p = r.artifact("latents", "latents.pt")
        if p is None:
            study.notes.append(f"t-SNE: row {r.name} has no latent cache (generator stage not run?).")
        elif p not in cache:
            z, y = _load_latents(p)
            cache[p] = _embed(z, y, "class", max_points, seed)
        return cache.get(p) if p is not None else None

    def reference(r: StudyRow) -> _Embedding | None:
        p = r.artifact("reference", "meta.json")
        if p is None:
            study.notes.append(f"t-SNE: row {r.name} has no reference set on disk.")
        elif p not in cache:
            ref = ReferenceSet.load(p.parent)
            label = "class" if ref.provenance.get("kind", "data") == "data" else "component"
            cache[p] = _embed(ref.x, ref.y, label, max_points, seed)
        return cache.get(p) if p is not None else None

    panels = [(r, latents(r), None if r.is_baseline else reference(r)) for r in rows]
    labels = {int(k) for _, *embs in panels for e in embs if e is not None and e.y is not None for k in np.unique(e.y)}
    colour = _class_colours(labels)
    fig = Figure(figsize=tsne_figsize(len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (r, z, ref), (ax_z, ax_ref) in zip(panels, axes):
        _panel(ax_z, z, f"{r.name}: {'baseline' if r.is_baseline else 'DMVAE'} latents", colour,
               "latent cache missing\n(generator stage not run?)")
        if r.is_baseline:
            _panel(ax_ref, None, f"{r.name}: no reference", colour, "baseline:\nno reference set, no DM")
        else:
            _panel(ax_ref, ref, f"{r.name}: reference set ({r.prior})", colour, "reference set missing")
    classes = sorted({int(k) for _, z, _ in panels if z is not None and z.y is not None for k in np.unique(z.y)})
    if classes:
        from matplotlib.lines import Line2D
        names = _class_names(study)
        handles = [Line2D([], [], ls="", marker="o", ms=5, color=colour(k),
                          label=f"{k} {names[k]}" if names and k < len(names) else str(k)) for k in classes]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7,
                   title="data class (latents and data-derived references; a synthetic reference's colours are its "
                   "components)", title_fontsize=7)
    fig.suptitle(f"t-SNE of latents and reference sets (Fig. 4), {study.name}", fontsize=11)
    return _save(fig, out / "fig4_tsne.png")


# ---- image grids ---------------------------------------------------------------------------------
def copy_grids(study: Study, out: Path) -> dict[str, dict[str, str]]:
    """Copy each row's eval `samples.png` / `reconstructions.png` to `grids/<row>_<kind>.png`;
    returns row -> kind -> path relative to `out`."""
    found: dict[str, dict[str, str]] = {}
    for r in study.ordered_rows():
        for kind in ("samples", "reconstructions"):
            src = r.artifact("eval", f"{kind}.png")
            if src is None:
                continue
            dst = out / "grids" / f"{_safe(r.name)}_{kind}.png"
            atomic_write_bytes(dst, src.read_bytes(), checksum=False)
            found.setdefault(r.name, {})[kind] = dst.relative_to(out).as_posix()
        if r.name not in found:
            study.notes.append(f"Row {r.name}: no eval image grids (eval stage missing).")
    return found


def _safe(name: str) -> str:
    """A row name as a file name (ablation rows look like `dm_weight=1.0`; keep them readable)."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


# ---- the report ----------------------------------------------------------------------------------
@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Cap torch and OpenMP/BLAS threads (sklearn's t-SNE gradient uses every core otherwise)."""
    from threadpoolctl import threadpool_limits
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(old)


def _header(study: Study) -> list[str]:
    n = study.gfid_samples
    lines = [f"# DMVAE study report: {study.name}", "",
             f"- study: `{study.stem}` · preset: `{study.preset}` · rows: {len(study.table)}",
             f"- feature extractor: `{study.extractor}` (rFID / gFID{f' on {n} samples' if n else ''} / IS in its "
             f"feature space)", f"- source: `{study.root.resolve()}`", ""]
    if bad := random_init_rows(study.table):
        lines += [f"> **Warning: random-init weights.** Row(s) {', '.join(f'`{b}`' for b in bad)} ran with randomly "
                  "initialised backbones (pretrained weights missing, `run.allow_random_weights`): their numbers "
                  "check the pipeline; they do not measure the prior.", ""]
    if study.extractor not in ("inception", "?"):
        lines += [f"> Note: FID here uses `{study.extractor}` features, not Inception: numbers are comparable across "
                  "rows of this study, not with published FIDs.", ""]
    return lines


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, max_points: int = 1000,
                 seed: int = 0, threads: int = 1) -> Path:
    """Build every table and figure of a study from its results folder; returns the `report.md` path.

    `out_dir` defaults to `<results_dir>/report/`. `max_points` caps the points of one t-SNE panel
    (0 skips the t-SNE). `threads` caps torch and OpenMP threads: one by default, since sklearn's
    Barnes-Hut t-SNE ran 4-8x slower with 2 threads than with 1 on a shared 2-core machine. Figures
    are written first, each atomically; `report.md` last, so a report that exists is complete.
    """
    study = load_study(results_dir)
    out = Path(out_dir) if out_dir is not None else study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    table_md = write_tables(study, out)
    figs: dict[str, Path | None] = {}
    grids: dict[str, dict[str, str]] = {}
    if study.rows:
        with _threads(threads):
            figs["curve"], curve_kind = plot_generator_curves(study, out)
            figs["dmd"] = plot_dmd_matching(study, out)
            figs["tsne"] = plot_tsne(study, out, max_points, seed) if max_points > 0 else None
        grids = copy_grids(study, out)

    rel = {k: p.relative_to(out).as_posix() for k, p in figs.items() if p is not None}
    md = _header(study)
    md += [f"## {'Table 1' if study.stem == 'table1' else 'Table 2' if study.stem == 'ablations' else 'Table'}", "",
           table_md, "", f"Files: [{study.stem}.csv]({study.stem}.csv) · [{study.stem}.md]({study.stem}.md) · "
           f"[{study.stem}.tex]({study.stem}.tex)", ""]
    if "curve" in rel:
        what = ("gFID of the stage-2 model during training, one line per row (baselines dashed); lower is better."
                if curve_kind == "gfid" else "No row logged a gFID curve (set `generator.eval_every > 0`): the "
                "stage-2 flow-matching training loss per row instead.")
        md += ["## Stage-2 convergence (Fig. 8)", "", what, "", f"![stage-2 convergence]({rel['curve']})", ""]
    if "dmd" in rel:
        md += ["## DMD distribution matching", "", "Sliced Wasserstein distance between the latents (through the "
               "projection head when shapes differ) and reference samples, on one batch per log step (so noisy), "
               "during the DMD stage.", "",
               f"![DMD matching]({rel['dmd']})", ""]
    if "tsne" in rel:
        md += ["## Latent t-SNE (Fig. 4)", "", f"Per row: stage-2 latents (left) and the reference set they were "
               f"matched to (right), each flattened, PCA to {TSNE_PCA_DIM} dims, t-SNE; at most {max_points} points "
               "per panel, class-balanced (paper: 100 samples of 20 classes).", "", f"![t-SNE]({rel['tsne']})", ""]
    if grids:
        md += ["## Samples and reconstructions", "",
               "Reconstructions: first half real validation images, second half their reconstructions.", ""]
        for row, g in grids.items():
            md += [f"### {row}", "", "| samples | reconstructions |", "|:-:|:-:|",
                   "| " + " | ".join(f"![{row} {k}]({g[k]})" if k in g else "–" for k in ("samples", "reconstructions"))
                   + " |", ""]
    if study.notes:
        md += ["## Notes", "", *[f"- {n}" for n in study.notes], ""]
    return atomic_write_text(out / "report.md", "\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.report", description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", help="a study's results folder, e.g. results/table1-smoke")
    ap.add_argument("--out", default=None, help="report folder (default: RESULTS_DIR/report)")
    ap.add_argument("--max-points", type=int, default=1000, help="t-SNE points per panel (0: skip the t-SNE)")
    ap.add_argument("--seed", type=int, default=0, help="subsample and t-SNE seed")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for t-SNE and torch (default: 1)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.results_dir, args.out, args.max_points, args.seed, args.threads)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
