"""Build a study's report: tables, figures and grids into `<study>/report/`, then the page."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dmvae_study.report.curves import STAGE_TITLES, plot_generator_curves, plot_stages
from dmvae_study.report.page import (Bullets, Figures, Image, Para, Part, Section, Table, render_html,
                                     render_markdown)
from dmvae_study.report.study import Study, drop_path_notice, load_study, shared_weights_notice
from dmvae_study.report.tables import TABLE_CAPTIONS, random_init_rows, row_settings, write_tables
from dmvae_study.report.tsne import TSNE_PCA_DIM, plot_tsne
from dmvae_study.store import atomic_write_bytes, atomic_write_text

GRID_KINDS = ("samples", "reconstructions")  # the eval stage's image grids, `<kind>.png`
STAGE_TEXT = {  # stage -> what its curves show, under its figure
    "dmd": "`match/swd`: sliced Wasserstein distance between the latents (through the projection head when shapes "
           "differ) and reference samples, on one batch per log step (so noisy); lower is closer.",
    "generator": "The stage-2 model's training loss and, when `generator.eval_every > 0`, its gFID (as Fig. 8).",
}


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


def _safe(name: str) -> str:
    """A row name as a file name (ablation rows look like `dm_weight=1.0`; keep them readable)."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def copy_grids(study: Study, out: Path) -> dict[str, dict[str, str]]:
    """Copy each row's eval `samples.png` / `reconstructions.png` (from the store, else the row's archive)
    to `grids/<row>_<kind>.png`;
    returns row -> kind -> path relative to `out`."""
    found: dict[str, dict[str, str]] = {}
    for r in study.ordered_rows():
        for kind in GRID_KINDS:
            src = r.artifact("eval", f"{kind}.png") or r.archived(f"{kind}.png")
            if src is None:
                continue
            dst = out / "grids" / f"{_safe(r.name)}_{kind}.png"
            atomic_write_bytes(dst, src.read_bytes(), checksum=False)
            found.setdefault(r.name, {})[kind] = dst.relative_to(out).as_posix()
        if r.name not in found:
            study.notes.append(f"Row {r.name}: no eval image grids (eval stage missing).")
    return found


def _shown_path(path: Path) -> str:
    """A folder as the header shows it: relative to the working directory when inside it (a report
    committed with its study, `docs/mini`, names no machine's path), else absolute."""
    p = path.resolve()
    return p.relative_to(Path.cwd()).as_posix() if p.is_relative_to(Path.cwd()) else str(p)


def _header(study: Study) -> Section:
    n = study.gfid_samples
    parts: list[Part] = [Bullets([f"study: `{study.stem}` · preset: `{study.preset}` · rows: {len(study.table)}",
                            f"feature extractor: `{study.extractor}` (rFID / gFID{f' on {n} samples' if n else ''} "
                            "/ IS in its feature space)", f"source: `{_shown_path(study.root)}`"])]
    if bad := random_init_rows(study.table):
        parts.append(Para(f"**Warning: random-init weights.** Row(s) {', '.join(f'`{b}`' for b in bad)} ran with "
                          "randomly initialised backbones (pretrained weights missing, `run.allow_random_weights`): "
                          "their numbers check the pipeline; they do not measure the prior.", callout=True))
    for notice in (drop_path_notice(study.ordered_rows()), shared_weights_notice(study.ordered_rows())):
        if notice:
            parts.append(Para(notice, callout=True))
    if study.extractor not in ("inception", "?"):
        parts.append(Para(f"Note: FID here uses `{study.extractor}` features, not Inception: numbers are comparable "
                          "across rows of this study, not with published FIDs.", callout=True))
    return Section("", parts)


def _table_sections(study: Study, out: Path) -> list[Section]:
    show, note = write_tables(study, out)
    stem = study.stem
    files = f"Files: [{stem}.csv]({stem}.csv) · [{stem}.md]({stem}.md) · [{stem}.tex]({stem}.tex)"
    sections = [Section(TABLE_CAPTIONS.get(stem, "Table"), [Table(show), Para(note), Para(files)])]
    settings = row_settings(study)
    if settings is not None:
        sections.append(Section("Row settings", [Para("What the study resolved for each row (its manifest's "
                                                      "`derived` values and seed)."), Table(settings)]))
    return sections


def _seed_sections(study: Study, out: Path) -> list[Section]:
    """Mean, std and 95% interval over seeds per row, and which gFID differences the seeds resolve."""
    from dmvae_study.report.stats import base_row, display_summary, pairwise, seed_summary
    summary = seed_summary(study.table)
    if summary is None:
        return []
    atomic_write_text(out / "seeds.csv", summary.to_csv(index=False))
    parts: list[Part] = [Para("Per row over its seeds: mean ± standard deviation [95% interval of the mean, "
                              "Student t]. Files: [seeds.csv](seeds.csv), [pairs.csv](pairs.csv)."),
                         Table(display_summary(summary))]
    rows = [base_row(r) for r in study.table["row"]]
    semantic = next((r for r in rows if r.startswith("dinov2")), None)
    for metric, name in (("gfid", "gFID"), ("rfid", "rFID"), ("psnr", "PSNR")):
        pairs = pairwise(study.table, metric, first=semantic)
        if pairs is None:
            continue
        file = "pairs.csv" if metric == "gfid" else f"pairs_{metric}.csv"
        atomic_write_text(out / file, pairs.to_csv(index=False))
        parts += [Para(f"{name} difference of each pair of rows (a - b) with its 95% interval (Welch): *resolved* "
                       f"when the interval excludes 0, i.e. the seeds tell the two rows apart. `paired_*`: the same "
                       f"difference paired by seed over the seeds both rows have (Student t; a seed's rows share its "
                       f"data order and, for the priors, its tokenizer artifact). File: [{file}]({file})."),
                  Table(pairs.round(3))]
    return [Section("Seeds and intervals", parts)]


def _figure_sections(study: Study, out: Path, max_points: int, seed: int) -> list[Section]:
    sections = []
    fig8, kind = plot_generator_curves(study, out)
    if fig8 is not None:
        what = ("gFID of the stage-2 model during training, one line per row (baselines dashed; a row run with several "
                "seeds: their mean, with a band of -+ one standard deviation); lower is better."
                if kind == "gfid" else "No row logged a gFID curve (set `generator.eval_every > 0`): the "
                "stage-2 flow-matching training loss per row instead.")
        image = Image(fig8.relative_to(out).as_posix(), "stage-2 convergence")
        sections.append(Section("Stage-2 convergence (Fig. 8)", [Para(what), Figures([image])]))
    stages = plot_stages(study, out)
    if stages:
        parts: list[Part] = [Para("Per stage, every metric it logs against training step, one line per row (baselines "
                            "dashed; rows sharing a stage's artifact are one line naming them all).")]
        for stage, path in stages.items():
            caption = f"**{STAGE_TITLES[stage]}** (stage `{stage}`). {STAGE_TEXT.get(stage, '')}".strip()
            parts.append(Figures([Image(path.relative_to(out).as_posix(), f"{stage} curves", caption)]))
        sections.append(Section("Training curves", parts))
    tsne = plot_tsne(study, out, max_points, seed) if max_points > 0 else None
    if tsne is not None:
        sections.append(Section("Latent t-SNE (Fig. 4)", [
            Para(f"Per row: stage-2 latents (left) and the reference set they were matched to (right), each "
                 f"flattened, PCA to {TSNE_PCA_DIM} dims, t-SNE; at most {max_points} points per panel, "
                 "class-balanced (paper: 100 samples of 20 classes)."),
            Figures([Image(tsne.relative_to(out).as_posix(), "t-SNE")])]))
    return sections


def _grid_sections(grids: dict[str, dict[str, str]]) -> list[Section]:
    if not grids:
        return []
    sections = [Section("Samples and reconstructions", [
        Para("Reconstructions: first half real validation images, second half their reconstructions.")])]
    for row, g in grids.items():
        images = [Image(g[k], f"{row} {k}", k) for k in GRID_KINDS if k in g]
        sections.append(Section(row, [Figures(images, side_by_side=True)], level=3))
    return sections


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, max_points: int = 1000,
                 seed: int = 0, threads: int = 1) -> Path:
    """Build every table and figure of a study from its results folder; returns the `report.md` path.

    `out_dir` defaults to `<results_dir>/report/`. `max_points` caps the points of one t-SNE panel
    (0 skips the t-SNE). `threads` caps torch and OpenMP threads: one by default, since sklearn's
    Barnes-Hut t-SNE ran 4-8x slower with 2 threads than with 1 on a shared 2-core machine. Figures
    are written first, each atomically, then `report.html`, and `report.md` last, so a report that
    exists is complete.
    """
    study = load_study(results_dir)
    out = Path(out_dir) if out_dir is not None else study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = [_header(study), *_table_sections(study, out), *_seed_sections(study, out)]
    if study.rows:
        with _threads(threads):
            sections += _figure_sections(study, out, max_points, seed)
        sections += _grid_sections(copy_grids(study, out))
    if study.notes:
        sections.append(Section("Notes", [Bullets(study.notes)]))
    title = f"DMVAE study report: {study.name}"
    atomic_write_text(out / "report.html", render_html(title, sections))
    return atomic_write_text(out / "report.md", render_markdown(title, sections))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.report",
                                 description="Study report: every table and figure rebuilt from a study's results "
                                             "folder alone (no training).")
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
    print(f"wrote {path} and {path.with_name('report.html').name}")
    if (Path(args.results_dir) / "frontier.csv").exists():  # a frontier study: its trade-off and matched table too
        from dmvae_study.report.frontier import build_frontier
        print(f"wrote {build_frontier(args.results_dir, path.parent)}")
    return 0
