"""The one data-loading path of the training stages: deterministic, resumable, rank-aware global batches.

Step `s` of a stage draws the global batch `perm_e[pos*B:(pos+1)*B]` of the epoch-`e` permutation
(`e, pos = divmod(s, N // B)`), seeded by (seed, stage, epoch); rank r takes the r-th slice. The
loader yields items indexed `(i, epoch)`, and `EpochIndexed` points the dataset's flip augmentation at
that epoch before fetching, so horizontal flips change every epoch while staying a pure function of
(seed, epoch, index): N loader workers, N Ray workers and a resumed run see the same batches as one
uninterrupted process.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


def hash_seed(*parts: Any) -> int:
    """A 56-bit seed from any tuple of plain values (stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def set_dataset_epoch(ds: Dataset, epoch: int) -> None:
    """Point a dataset's (through Subset wrappers) flip augmentation at `epoch`."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)  # type: ignore[attr-defined]


class EpochIndexed(Dataset):
    """`dataset[(i, epoch)]` = `dataset[i]` with the flips of that epoch. Each loader worker holds its
    own copy of the dataset and fetches one item at a time, so setting the epoch per item is safe."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        set_dataset_epoch(self.dataset, epoch)
        return self.dataset[i]


class GlobalBatches:
    """Per-epoch permutations of `n` items, cut into global batches of `global_batch` (one shuffle per
    epoch, cached: 1.28M indices for ImageNet), and this rank's share of each."""

    def __init__(self, n: int, global_batch: int, *, seed: int, stage: str, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} workers; "
                             f"set the stage's batch_size to a multiple of run.num_workers")
        self.n, self.gb, self.seed, self.stage, self.rank, self.world = n, global_batch, seed, stage, rank, world
        self.per_epoch = max(n // global_batch, 1)
        self._key: int | None = None
        self._perm: torch.Tensor | None = None

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices `(global_batch / world,)` of this rank's share of the global batch at `step`."""
        epoch, pos = divmod(step, self.per_epoch)
        if self._key != epoch:
            g = torch.Generator()
            g.manual_seed(hash_seed(self.seed, self.stage, epoch, 7))
            perm = torch.randperm(self.n, generator=g)
            if self.n < self.gb:
                perm = perm.repeat(math.ceil(self.gb / self.n))
            self._key, self._perm = epoch, perm
        rows = self._perm[pos * self.gb:(pos + 1) * self.gb]  # type: ignore[index]
        b = self.gb // self.world
        return rows[self.rank * b:(self.rank + 1) * b]


class StepBatchSampler(Sampler):
    """Batch sampler of `[(index, epoch), ...]` for steps `start .. total - 1`: the same order after a resume."""

    def __init__(self, batches: GlobalBatches, start: int, total: int):
        self.batches, self.start, self.total = batches, start, total

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            e = self.batches.epoch(step)
            yield [(int(i), e) for i in self.batches.indices(step)]

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


OWN_GENERATOR = True  # False: the pre-fix behaviour (tests/test_regression.py pins it to compare old numbers)


def step_loader(dataset: Dataset, batches: GlobalBatches, start: int, total: int, *, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """DataLoader yielding `(img (b, C, H, W), y (b,))` for each step from `start` to `total`."""
    # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from the *global*
    # RNG, which would shift the stream a resumed stage restores (the beta-VAE posterior noise draws from it).
    return DataLoader(EpochIndexed(dataset), batch_sampler=StepBatchSampler(batches, start, total),
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(0) if OWN_GENERATOR else None)


__all__ = ["EpochIndexed", "GlobalBatches", "StepBatchSampler", "hash_seed", "set_dataset_epoch", "step_loader"]
