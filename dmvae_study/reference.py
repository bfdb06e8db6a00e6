"""Reference sets: the samples of a prior that a teacher score model learns (paper Sec. 4).

On disk, a reference set is an artifact folder of tensor shards `shard-00000.pt` (each
`{"x": (n, C, H, W) float16 (float32 for `exact` sets), "y": (n,) int64}`, atomically written and
checksummed) plus
`meta.json` (shape, count, labels, standardisation and provenance). Samples are standardised
to zero mean and unit variance overall (`mean`, `scale` recorded), so every prior meets the
flow-matching noise N(0, I) on the same footing. Token-sequence priors `(L, D)` are stored as
`(D, 1, L)`: channels first, one row of L tokens, which the DiT patchifies like any grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmvae_study.store import ArtifactDir, atomic_write_text, load_torch, save_torch


@dataclass
class ReferenceSet:
    """Standardised reference samples `x` `(N, C, H, W)`, optional labels `y` `(N,)`, provenance."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    num_classes: int = 0
    mean: float = 0.0
    scale: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict)
    exact: bool = False  # stored float32 (tokenizer latents, App. A.2: the reference *is* the latent set)

    def __post_init__(self) -> None:
        if self.x.dim() == 3:  # (N, L, D) tokens -> (N, D, 1, L)
            self.x = self.x.transpose(1, 2).unsqueeze(2)
        if self.x.dim() != 4:
            raise ValueError(f"reference samples must be (N, C, H, W) or (N, L, D), got {tuple(self.x.shape)}")
        if self.y is not None and self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"{self.y.shape[0]} labels for {self.x.shape[0]} samples")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def standardised(cls, x: torch.Tensor, y: torch.Tensor | None = None, **kw: Any) -> "ReferenceSet":
        """Standardise raw samples to overall mean 0 / std 1 and record the affine map."""
        x = x.float()
        mean, scale = float(x.mean()), float(x.std().clamp_min(1e-8))
        return cls(x=(x - mean) / scale, y=y, mean=mean, scale=scale, **kw)

    def save(self, art: ArtifactDir, shard_size: int = 4096) -> None:
        n = len(self)
        for i, start in enumerate(range(0, n, shard_size)):
            sl = slice(start, start + shard_size)
            shard = {"x": self.x[sl].to(torch.float32 if self.exact else torch.float16).contiguous()}
            if self.y is not None:
                shard["y"] = self.y[sl].long().contiguous()
            save_torch(art.file(f"shard-{i:05d}.pt"), shard)
        meta = {"count": n, "shape": list(self.sample_shape), "num_classes": self.num_classes,
                "labels": self.y is not None, "mean": self.mean, "scale": self.scale,
                "shards": (n + shard_size - 1) // shard_size, "exact": self.exact, "provenance": self.provenance}
        atomic_write_text(art.file("meta.json"), json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, art: ArtifactDir | str | Path) -> "ReferenceSet":
        art = art if isinstance(art, ArtifactDir) else ArtifactDir(art)
        meta_path = art.file("meta.json")
        if not meta_path.exists():
            raise FileNotFoundError(f"no reference set at {art.path}: build it first (the `reference` stage)")
        meta = json.loads(meta_path.read_text())
        shards = [load_torch(art.file(f"shard-{i:05d}.pt")) for i in range(meta["shards"])]
        x = torch.cat([s["x"] for s in shards]).float()
        y = torch.cat([s["y"] for s in shards]) if meta["labels"] else None
        return cls(x=x, y=y, num_classes=meta["num_classes"], mean=meta["mean"], scale=meta["scale"],
                   provenance=meta["provenance"], exact=bool(meta.get("exact", False)))
