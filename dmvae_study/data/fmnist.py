"""Fashion-MNIST from its IDX files: the configured root, the Debian package folder
(`apt-get install dataset-fashion-mnist`), then torchvision's download when a network exists."""

from __future__ import annotations

import gzip
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmvae_study.data.common import DatasetNotFoundError, _EpochAugment

log = logging.getLogger(__name__)

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where the Debian package `dataset-fashion-mnist` puts the IDX files; a tuple so tests can patch it.
FMNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DATA_CACHE = Path(os.environ.get("DMVAE_DATA_DIR", Path.home() / ".cache" / "dmvae_study" / "data"))


# ---- Fashion-MNIST -------------------------------------------------------------------------------

def _open_idx(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return fh.read()


@lru_cache(maxsize=4)
def _read_idx(path: str, mtime: float) -> np.ndarray:
    """IDX file (gz or raw) -> uint8 array; cached per (path, mtime) since train/val/limits re-read it."""
    buf = _open_idx(Path(path))
    magic = int.from_bytes(buf[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def _find_idx(d: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def _fmnist_candidates(root: str | Path | None) -> list[Path]:
    dirs = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]
    dirs += list(FMNIST_DIRS)
    dirs.append(DATA_CACHE / "FashionMNIST" / "raw")
    return dirs


def find_fmnist(root: str | Path | None = None, download: bool = True) -> Path:
    """Directory holding the four Fashion-MNIST IDX files: `root`, the Debian package's location,
    the cache, else torchvision's downloader (when online). Raises DatasetNotFoundError listing all."""
    stems = [s for pair in FMNIST_FILES.values() for s in pair]
    looked = _fmnist_candidates(root)
    for d in looked:
        if all(_find_idx(d, s) for s in stems):
            return d
    err = "download disabled"
    if download:
        target = Path(root).expanduser() if root is not None else DATA_CACHE
        try:
            import torchvision
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
            d = target / "FashionMNIST" / "raw"
            if all(_find_idx(d, s) for s in stems):
                return d
            err = f"torchvision download finished but files are not in {d}"
        except Exception as e:  # offline, mirror down, read-only target: report, do not crash here
            err = f"torchvision download failed: {type(e).__name__}: {' '.join(str(e).split())}"
    raise DatasetNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] etc.) not found. Looked in: "
        + ", ".join(str(d) for d in looked) + f"; {err}. Install them with "
        "`apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
        "or put the four IDX files in a folder and set data.root to it.")


class FashionMNIST(_EpochAugment, Dataset):
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from IDX files.

    Images stay uint8 `(N, 28, 28)` in memory and are transformed per item: `fit="resize"` is a
    bilinear (antialiased) resize to `resolution`, `fit="pad"` centres the 28x28 image on a black
    canvas (needs resolution >= 28). `channels=3` repeats the grey channel. `split` "val" is the
    10k test set (the standard held-out split)."""

    classes = list(FMNIST_CLASSES)

    def __init__(self, root: str | Path | None = None, split: str = "train", resolution: int = 28,
                 channels: int = 1, hflip: bool = False, fit: str = "resize", download: bool = True,
                 flip_seed: int = 0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}")
        if fit == "pad" and resolution < 28:
            raise ValueError(f"fit='pad' needs resolution >= 28, got {resolution}; use fit='resize'")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.split, self.resolution, self.channels, self.fit = split, int(resolution), channels, fit
        self.hflip, self.flip_seed = hflip, flip_seed
        self.root = find_fmnist(root, download)
        img_stem, lbl_stem = FMNIST_FILES["train" if split == "train" else "test"]
        ip, lp = _find_idx(self.root, img_stem), _find_idx(self.root, lbl_stem)
        assert ip is not None and lp is not None
        self.images = torch.from_numpy(_read_idx(str(ip), ip.stat().st_mtime).copy())   # (N, 28, 28) uint8
        self.targets = torch.from_numpy(_read_idx(str(lp), lp.stat().st_mtime).astype(np.int64))
        if len(self.images) != len(self.targets):
            raise ValueError(f"{ip} and {lp} disagree on the number of items")

    def __len__(self) -> int:
        return len(self.images)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 `(B, 28, 28)` -> float `(B, C, R, R)` in [-1, 1] (batched, for bulk feature extraction)."""
        x = x[:, None].float().div(127.5).sub(1.0)
        r = self.resolution
        if self.fit == "resize" and r != x.shape[-1]:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True).clamp_(-1, 1)
        elif self.fit == "pad" and r != x.shape[-1]:
            p = r - x.shape[-1]
            x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
        return x.expand(-1, self.channels, -1, -1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.transform(self.images[index][None])[0]
        return (img.flip(-1) if self._flip(index) else img), int(self.targets[index])


