"""Fig. 4: t-SNE of each row's stage-2 latents next to the reference set it was matched to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from dmvae_study.report.curves import save_png
from dmvae_study.report.stats import base_row
from dmvae_study.report.study import Study, StudyRow
from dmvae_study.store import load_torch

TSNE_PANEL_IN = 3.4         # inches per t-SNE panel (square)
TSNE_LEGEND_IN = 0.7        # inches of the shared class legend under the t-SNE grid
TSNE_PCA_DIM = 50           # usual t-SNE preprocessing: PCA to 50 dims first
LATENT_FILES = ("index.json", "latents.pt")  # the latent cache's entry file: sharded, or an older single file
BIG_LATENTS_BYTES = 512 << 20  # above this, latents are memory-mapped instead of checksum-verified


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


def reference_labels(provenance: dict[str, Any]) -> str:
    """What a reference set's labels are: data classes when it was built from the dataset's images (or
    their captions; sub_dino too, though it counts as synthetic for its DM weight), else the synthetic
    prior's mixture components (GMM)."""
    return "class" if provenance.get("kind", "data") == "data" or "images" in provenance else "component"


def pca_points(x: torch.Tensor | np.ndarray, seed: int = 0) -> np.ndarray:
    """`(M, ...)` samples, each flattened, then PCA to `TSNE_PCA_DIM` dims when they have more."""
    from sklearn.decomposition import PCA
    f = np.asarray(x.double() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(x.shape[0], -1)
    if f.shape[1] > TSNE_PCA_DIM and f.shape[0] > TSNE_PCA_DIM:
        f = PCA(TSNE_PCA_DIM, random_state=seed).fit_transform(f)
    return f


def tsne_embed(x: torch.Tensor | np.ndarray, seed: int = 0) -> np.ndarray:
    """`(M, ...)` samples, each flattened -> `(M, 2)` t-SNE coordinates (PCA to 50 dims first)."""
    from sklearn.manifold import TSNE
    f = pca_points(x, seed)
    perplexity = float(min(30.0, max(2.0, (f.shape[0] - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1).fit_transform(f)


def load_latents(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stage-2 latent cache: its sharded, memory-mapped form (`index.json`, `dmvae_study.latent_cache`),
    or an older single `{"z", "y"}` file; only the subsample is read."""
    if path.name == "index.json":
        from dmvae_study.latent_cache import read_latents
        from dmvae_study.store import ArtifactDir
        return read_latents(ArtifactDir(path.parent))  # type: ignore[return-value]
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


def _embed(x: torch.Tensor, y: torch.Tensor | None, label: str, max_points: int, seed: int,
           count: int | None = None) -> _Embedding:
    idx = select(y, x.shape[0], max_points, seed=seed)
    return _Embedding(tsne_embed(x[idx].float(), seed), None if y is None else y[idx].numpy(), label,
                      x.shape[0] if count is None else count)


def archived_set(row: StudyRow, prefix: str, max_points: int, seed: int) -> _Embedding | None:
    """A t-SNE panel from the row's archive (`tsne.npz`, `prefix` = "latents" or "reference"): its
    points are a seed-0 subsample already reduced by PCA, subsampled again when above `max_points`."""
    p = row.archived("tsne.npz")
    if p is None:
        return None
    with np.load(p) as d:
        if prefix not in d:
            return None
        x = torch.from_numpy(d[prefix].astype(np.float64))
        y = torch.from_numpy(d[f"{prefix}_y"]) if f"{prefix}_y" in d else None
        return _embed(x, y, str(d[f"{prefix}_label"]), max_points, seed, count=int(d[f"{prefix}_count"]))


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


def _latent_file(r: StudyRow) -> Path | None:
    return next((p for f in LATENT_FILES if (p := r.artifact("latents", f)) is not None), None)


def _has_latents(r: StudyRow) -> bool:
    return _latent_file(r) is not None or r.archived("tsne.npz") is not None


def _one_seed_per_row(study: Study) -> list[StudyRow]:
    """One seed of each row (`<row>-s<k>`), in table order: the first whose latents are on disk or archived,
    else the first. The embedding shows the geometry of a row's latent space, which a second seed repeats
    rather than adds to."""
    shown: dict[str, StudyRow] = {}
    for r in study.ordered_rows():  # the first seed whose latents are on disk or archived, else the first seed
        first = shown.setdefault(base_row(r.name), r)
        if not _has_latents(first) and _has_latents(r):
            shown[base_row(r.name)] = r
    if len(shown) < len(study.rows):
        study.notes.append(f"t-SNE: one seed per row ({', '.join(r.name for r in shown.values())}).")
    return list(shown.values())


def plot_tsne(study: Study, out: Path, max_points: int = 1000, seed: int = 0) -> Path | None:
    """Fig. 4: per row, t-SNE of its stage-2 latents (left) next to its reference set (right; none
    for baselines), points coloured by class (GMM reference: by component)."""
    from dmvae_study.reference import ReferenceSet
    rows = _one_seed_per_row(study)
    if not rows:
        return None
    cache: dict[Path, _Embedding] = {}  # ablation rows often share a reference set or a latent cache

    def latents(r: StudyRow) -> _Embedding | None:
        p = _latent_file(r)
        if p is None:
            if (emb := archived_set(r, "latents", max_points, seed)) is None:
                study.notes.append(f"t-SNE: row {r.name} has no latent cache on disk or in its archive.")
            return emb
        if p not in cache:
            z, y = load_latents(p)
            cache[p] = _embed(z, y, "class", max_points, seed)
        return cache[p]

    def reference(r: StudyRow) -> _Embedding | None:
        p = r.artifact("reference", "meta.json")
        if p is None:
            if (emb := archived_set(r, "reference", max_points, seed)) is None:
                study.notes.append(f"t-SNE: row {r.name} has no reference set on disk or in its archive.")
            return emb
        if p not in cache:
            ref = ReferenceSet.load(p.parent)
            cache[p] = _embed(ref.x, ref.y, reference_labels(ref.provenance), max_points, seed)
        return cache.get(p) if p is not None else None

    panels = [(r, latents(r), None if r.is_baseline else reference(r)) for r in rows]
    panels = [p for p in panels if p[1] is not None or p[2] is not None]  # a row with nothing to draw: only its note
    if not panels:
        return None
    rows = [r for r, *_ in panels]
    labels = {int(k) for _, *embs in panels for e in embs if e is not None and e.y is not None for k in np.unique(e.y)}
    colour = _class_colours(labels)
    fig = Figure(figsize=tsne_figsize(len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (r, z, ref), (ax_z, ax_ref) in zip(panels, axes):
        _panel(ax_z, z, f"{r.name}: {'baseline' if r.is_baseline else 'DMVAE'} latents", colour,
               "latent cache missing\n(not on disk, not archived)")
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
    return save_png(fig, out / "fig4_tsne.png")
