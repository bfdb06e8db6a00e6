"""t-SNE of a reference set or of latents, coloured by class (paper Fig. 4 a-d, Sec. 4 "t-SNE
Visualization": 100 random samples from each of 20 random classes).

    python -m priors.tsne results/.../reference/reference-<digest> --out dino.png
    python -m priors.tsne dinov2 --preset smoke --out dino.png     # builds / reuses the stage's set
    python -m priors.tsne latents.pt --out z.png                    # a {"x": (N, ...), "y": (N,)} file

Each sample is flattened; above 50 dimensions PCA reduces it to 50 first (the usual t-SNE
preprocessing), then sklearn's TSNE (PCA init, seeded) embeds it in 2D.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dmvae_study.reference import ReferenceSet
from dmvae_study.report import tsne_embed  # one t-SNE recipe, shared with the report



def select(y: torch.Tensor | None, n: int, n_per_class: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of `n_per_class` random samples from each of `classes` random classes (all when
    unlabelled: `n_per_class * classes` random samples)."""
    g = torch.Generator().manual_seed(seed)
    if y is None:
        return torch.randperm(n, generator=g)[: n_per_class * classes].sort().values
    present = torch.unique(y)
    keep = present[torch.randperm(len(present), generator=g)[:classes]].sort().values
    idx = []
    for c in keep:
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:n_per_class]])
    return torch.cat(idx).sort().values



def plot_tsne(data: ReferenceSet | torch.Tensor, out: str | Path | None, labels: torch.Tensor | None = None,
              n_per_class: int = 100, classes: int = 20, seed: int = 0, title: str | None = None,
              class_names: Sequence[str] | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
    """t-SNE of a reference set (or of latents `(N, C, H, W)` with `labels` `(N,)`), coloured by
    class; saved as a PNG at `out` when given. Returns the `(M, 2)` embedding and its labels."""
    if isinstance(data, ReferenceSet):
        x, y = data.x, data.y
        title = title or str(data.provenance.get("prior", "reference set"))
    else:
        x, y = data, labels
    idx = select(y, x.shape[0], n_per_class, classes, seed)
    x, y = x[idx].float(), (y[idx] if y is not None else None)
    emb = tsne_embed(x, seed)
    if out is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 6))
        if y is None:
            ax.scatter(emb[:, 0], emb[:, 1], s=4, c="tab:blue")
        else:
            ks = torch.unique(y).tolist()
            cmap = plt.get_cmap("tab20" if len(ks) <= 20 else "hsv", max(len(ks), 1))
            for j, k in enumerate(ks):
                m = (y == k).numpy()
                name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
                ax.scatter(emb[m, 0], emb[m, 1], s=4, color=cmap(j), label=name)
            if len(ks) <= 20:
                ax.legend(markerscale=3, fontsize=6, loc="best", ncol=2)
        ax.set_title(f"{title or 't-SNE'} ({len(idx)} samples)")
        ax.set_xticks([])
        ax.set_yticks([])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150, bbox_inches="tight")
        plt.close(fig)
    return emb, y


def _load(target: str, preset: str, overrides: list[str]) -> tuple[ReferenceSet | torch.Tensor, torch.Tensor | None]:
    p = Path(target)
    if p.is_dir():
        return ReferenceSet.load(p), None
    if p.is_file():
        from dmvae_study.store import load_torch
        d = load_torch(p)
        x = d.get("x", d.get("z")) if isinstance(d, dict) else d
        return x, d.get("y") if isinstance(d, dict) else None
    # a prior name: the pipeline's reference artifact for this row, built here (with its inputs) if missing
    from dmvae_study.presets import preset as make_preset
    from dmvae_study.pipeline import LaunchOptions, artifact, resolve
    from trainers.launch import ensure  # the CLI convenience; the registry itself never imports trainers
    cfg = resolve(make_preset(preset, overrides), target)
    ensure("reference", cfg, LaunchOptions(row=target))
    return ReferenceSet.load(artifact(cfg, "reference")), None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m priors.tsne", description=__doc__.split("\n")[0])
    ap.add_argument("target", help="reference-set folder, a .pt file of {x, y}, or a prior name")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--preset", default="smoke", help="config preset when target is a prior name")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="dotted override when target is a prior name, e.g. prior.num_samples=2000")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data, y = _load(args.target, args.preset, args.overrides)
    emb, _ = plot_tsne(data, args.out, y, args.n_per_class, args.classes, args.seed)
    print(f"wrote {args.out} ({emb.shape[0]} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
