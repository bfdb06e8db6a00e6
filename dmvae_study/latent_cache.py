"""The stage-2 latent cache read back: its memory-mapped shards (written by `trainers.latents`) as one
read-only array, for the generator stage and the report (which imports no trainer)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch

from dmvae_study.store import ArtifactDir, load_torch


class LatentCache:
    """The finished cache as one read-only `(N, C, h, w)` array over its memory-mapped shards: `cache[idx]`
    reads only the rows `idx` (a LongTensor, a list or a slice) into a tensor (float16 unless a shard is
    float32), as `fit_flow_model` indexes its training set; nothing else is loaded."""

    def __init__(self, art: ArtifactDir):
        index = json.loads(art.file("index.json").read_text())
        self.maps = [np.load(art.file(s["file"]), mmap_mode="r") for s in index["shards"]]
        rows = [m.shape[0] for m in self.maps]
        self.starts = torch.tensor([0, *np.cumsum(rows)[:-1].tolist()], dtype=torch.int64)
        self.shape = torch.Size([sum(rows), *index["shape"]])
        self.dtype = torch.float16 if all(m.dtype == np.float16 for m in self.maps) else torch.float32
        if sum(rows) != index["count"]:
            raise ValueError(f"latent cache {art.path}: shards hold {sum(rows)} rows, the index says {index['count']}")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: int | torch.Tensor | Sequence[int] | slice) -> torch.Tensor:
        if isinstance(idx, int):
            return self[[idx]][0]
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        idx = torch.where(idx < 0, idx + len(self), idx)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"latent index out of range for {len(self)} rows")
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for s in shard.unique().tolist():
            m = shard == s
            out[m] = torch.from_numpy(np.asarray(self.maps[s][(idx[m] - self.starts[s]).numpy()])).to(self.dtype)
        return out


def read_latents(art: ArtifactDir) -> tuple[LatentCache, torch.Tensor]:
    """`(LatentCache (N, C, h, w), labels (N,))` of a finished latents artifact."""
    return LatentCache(art), load_torch(art.file("labels.pt"))
