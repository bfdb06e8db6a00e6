"""Resumable, rank-aware DataLoaders over the datasets of `dmvae_study.data`.

Flips depend only on (seed, epoch, index) and the order on (seed, epoch), so the worker count and a
resume change neither what an item looks like nor which items a rank sees.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dmvae_study.data import _mix

def _set_dataset_epoch(ds: Dataset, epoch: int) -> None:
    while isinstance(ds, Subset):
        ds = ds.dataset
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)  # type: ignore[attr-defined]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded by (seed, epoch), rank-sliced) that can start mid-epoch.

    Works without a process group (one replica). `set_epoch(e, skip_samples=k)` drops this rank's
    first k samples of epoch e, so a resumed run continues with exactly the batches it had not seen."""

    def __init__(self, dataset: Dataset, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        ddp = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ddp else 1)
        rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = int(skip_samples)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"], state["start"])


def make_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, epoch: int = 0, skip_batches: int = 0,
                shuffle: bool = True, drop_last: bool = True, num_workers: int = 0, pin_memory: bool = False,
                num_replicas: int | None = None, rank: int | None = None) -> DataLoader:
    """DataLoader over this rank's share (DistributedSampler semantics when torch.distributed is up).

    `batch_size` is per rank. The order is a function of (seed, epoch) only; `skip_batches` resumes
    mid-epoch (see `loader_position`). For a later epoch call `set_loader_epoch`."""
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(_mix(seed, epoch) & 0x7FFFFFFFFFFFFFFF))
    set_loader_epoch(loader, epoch, skip_batches)
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point the loader's sampler and dataset (flip augmentation) at `epoch`, skipping `skip_batches`."""
    assert isinstance(loader.sampler, ResumableSampler), "use make_loader to build the loader"
    loader.sampler.set_epoch(epoch, skip_batches * int(loader.batch_size or 1))
    _set_dataset_epoch(loader.dataset, epoch)


def loader_position(step: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches to skip) after `step` consumed batches: where a resumed run starts."""
    if batches_per_epoch <= 0:
        raise ValueError("the dataset yields no full batch per epoch; lower the batch size")
    return divmod(int(step), int(batches_per_epoch))
