"""A row's archive `rows/<row>/`: what the report draws for the row, small enough to commit.

The artifact store holds checkpoints and latent caches (gigabytes); it does not outlive the
machine that trained them, while a study run in parts commits only its `rows/*.json`. Without
more, a report rebuilt from committed parts has tables but no curves, t-SNE or grids for the rows
trained elsewhere. So each finished row also leaves, next to its manifest:

- `curves/<stage>.jsonl`: each stage's `metrics.jsonl` (loss curves, Fig. 8's gFID curve);
- `samples.png`, `reconstructions.png`: the eval stage's image grids;
- `tsne.npz`: Fig. 4's inputs, a class-balanced subsample (`ARCHIVE_POINTS`, `select` at seed 0) of
  the stage-2 latents and of the reference set, each flattened and reduced by PCA to
  `TSNE_PCA_DIM` dims (what `tsne_embed` reduces them to anyway), as float16: ~100 kB a set.

About 0.5 MB a row. The report reads an artifact from the store when it is on disk, else from the
archive. `python -m dmvae_study.report.archive STUDY_DIR` archives every row of a study folder whose
artifacts are still on disk (rows finished before archiving existed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmvae_study.report.tsne import LATENT_FILES, load_latents, pca_points, reference_labels, select

ARCHIVE_POINTS = 1000  # points per t-SNE set kept in the archive (the report's default `--max-points`)
GRID_FILES = ("samples.png", "reconstructions.png")
CURVE_STAGES = ("tokenizer", "teacher", "dmd", "refine", "generator")


def archive_dir(root: Path, row: str) -> Path:
    return Path(root) / "rows" / row


def _subsample(prefix: str, x: torch.Tensor, y: torch.Tensor | None, label: str) -> dict[str, Any]:
    idx = select(y, x.shape[0], ARCHIVE_POINTS, seed=0)
    out = {prefix: pca_points(x[idx].float()).astype(np.float16), f"{prefix}_count": np.int64(x.shape[0]),
           f"{prefix}_label": np.str_(label)}
    if y is not None:
        out[f"{prefix}_y"] = y[idx].numpy().astype(np.int64)
    return out


def tsne_inputs(artifacts: dict[str, Path]) -> dict[str, Any]:
    """The archive's `tsne.npz` arrays from a row's latent cache and reference set (those on disk)."""
    from dmvae_study.reference import ReferenceSet
    arrays: dict[str, Any] = {}
    lat = artifacts.get("latents")
    p = None if lat is None else next((lat / f for f in LATENT_FILES if (lat / f).exists()), None)
    if p is not None:
        z, y = load_latents(p)
        arrays |= _subsample("latents", z, y, "class")
    ref = artifacts.get("reference")
    if ref is not None and (ref / "meta.json").exists():
        r = ReferenceSet.load(ref)
        arrays |= _subsample("reference", r.x, r.y, reference_labels(r.provenance))
    return arrays


def archive_row(root: str | Path, row: str, artifacts: dict[str, Path]) -> Path:
    """Write `rows/<row>/` from the row's artifact folders (stage -> folder; missing ones are skipped).
    The folder is built under a temporary name and renamed into place: an archive that exists is whole."""
    root = Path(root)
    dst = archive_dir(root, row)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{row}.", dir=dst.parent))
    try:
        for stage in CURVE_STAGES:
            src = artifacts.get(stage)
            if src is not None and (src / "metrics.jsonl").exists():
                (tmp / "curves").mkdir(exist_ok=True)
                shutil.copyfile(src / "metrics.jsonl", tmp / "curves" / f"{stage}.jsonl")
        ev = artifacts.get("eval")
        for f in GRID_FILES:
            if ev is not None and (ev / f).exists():
                shutil.copyfile(ev / f, tmp / f)
        arrays = tsne_inputs(artifacts)
        if arrays:
            with open(tmp / "tsne.npz", "wb") as fh:
                np.savez_compressed(fh, **arrays)
        tmp.chmod(0o755)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def archive_study(results_dir: str | Path, force: bool = False) -> list[str]:
    """Archive every row of a study folder whose manifest's artifacts are on disk and that has no
    archive yet (all of them with `force`); returns the rows archived."""
    root = Path(results_dir)
    done = []
    for m in sorted((root / "rows").glob("*.json")):
        if m.name.endswith((".failed.json", ".stopped.json")):
            continue
        blob = json.loads(m.read_text())
        row = blob["row"]
        arts = {s: (root / a).resolve() for s, a in blob.get("artifacts", {}).items()}
        if (archive_dir(root, row).exists() and not force) or not any(a.exists() for a in arts.values()):
            continue
        archive_row(root, row, {s: a for s, a in arts.items() if a.exists()})
        done.append(row)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.report.archive",
                                 description="Write rows/<row>/ (curves, grids, t-SNE inputs) for the rows of a study "
                                             "folder whose artifacts are on disk, so the report can be rebuilt "
                                             "from the committed rows alone.")
    ap.add_argument("results_dir", help="a study's results folder, e.g. results/table1-mini")
    ap.add_argument("--force", action="store_true", help="rewrite archives that exist")
    args = ap.parse_args(argv)
    if not (Path(args.results_dir) / "rows").is_dir():
        print(f"error: {args.results_dir} has no rows/ folder: is it a study results folder?", file=sys.stderr)
        return 2
    rows = archive_study(args.results_dir, args.force)
    print(f"archived {len(rows)} row(s){': ' + ', '.join(rows) if rows else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
