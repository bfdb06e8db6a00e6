"""Frozen-backbone features, computed once: a frozen pretrained encoder (App. A.1: "we freeze the
parameters of the DINO-v2 encoder") maps each training image, and its horizontal flip, to the same
features at every step, so the tokenizer stage computes them once per (dataset, backbone) and its loop
runs only the projector and decoder. VA-VAE's frozen alignment features use the same cache. Nothing
changes in what is computed: the same module in eval mode on the same (possibly flipped) images.

The cache is a store artifact (`features`) keyed by the data section, backbone, layer, grid and weights,
shared by every row and seed of a study; float32, so the cached values are the ones the loop would compute.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset, Subset

from dmvae_study.data import build_dataset
from dmvae_study.loaders import set_dataset_epoch
from dmvae_study.pipeline import store_of
from dmvae_study.store import load_torch, save_torch
from trainers.common import StageContext

BATCH = 128


class WithFeatures(Dataset):
    """`(img, label, features)` where `features` are the cached frozen features of exactly that image as
    the dataset returned it (flipped or not at the current epoch)."""

    def __init__(self, dataset: Dataset, plain: torch.Tensor, flipped: torch.Tensor):
        self.dataset, self.plain, self.flipped = dataset, plain, flipped

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        set_dataset_epoch(self.dataset, epoch)

    def __getitem__(self, i: int):
        img, y = self.dataset[i]
        root, j = self.dataset, i
        while isinstance(root, Subset):
            root, j = root.dataset, root.indices[j]
        flipped = bool(getattr(root, "_flip", lambda _: False)(j))
        return img, y, (self.flipped if flipped else self.plain)[i]


def cached_features(ctx: StageContext, name: str, encode: Callable[[torch.Tensor], torch.Tensor],
                    key: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features `(N, D, h, w)` float32 of every training image and of its flip (in dataset order),
    from the store or computed now (main rank; the others wait)."""
    cfg = ctx.cfg
    art = store_of(cfg).artifact("features", {"data": {**cfg.data.to_dict(), "hflip": None}, "net": name, **key})
    if not art.done and ctx.is_main:
        ds = build_dataset(cfg.data, "train", hflip=False)
        plain, flipped = [], []
        with torch.no_grad():
            for s in range(0, len(ds), BATCH):
                img = torch.stack([ds[i][0] for i in range(s, min(s + BATCH, len(ds)))]).to(ctx.device)
                plain.append(encode(img).float().cpu())
                flipped.append(encode(img.flip(-1)).float().cpu())
        save_torch(art.file("features.pt"), {"plain": torch.cat(plain), "flipped": torch.cat(flipped)})
        art.mark_done({"count": len(ds), "shape": list(plain[0].shape[1:]), "net": name})
    ctx.barrier()
    d = load_torch(art.file("features.pt"))
    return d["plain"], d["flipped"]
