"""What every dataset shares: per-item deterministic flips (a pure function of (flip_seed, epoch, index)),
uint8 -> [-1, 1] conversion, and the not-found error."""

from __future__ import annotations

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says where and how to get them."""


# ---- deterministic augmentation ----------------------------------------------------------------

def _mix(*keys: int) -> int:
    """splitmix64 of a tuple of ints: a cheap, platform-independent hash for per-item randomness."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


class _EpochAugment:
    """Mixin: `hflip` decided by (flip_seed, epoch, index); `set_epoch` is called by the loader helpers."""

    hflip: bool = False
    flip_seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _flip(self, index: int) -> bool:
        return bool(self.hflip) and bool(_mix(self.flip_seed, self.epoch, index) & 1)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 `(H, W, 3)` or `(H, W)` -> float `(C, H, W)` in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float().div_(127.5).sub_(1.0)


