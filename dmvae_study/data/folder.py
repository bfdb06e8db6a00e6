"""ImageNet-style image folders `root/<split>/<class>/*.jpg`, robust to awkward files (grey, CMYK, 16-bit,
palette, transparent, tiny, corrupt or truncated images: converted, or skipped and counted)."""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmvae_study.data.common import DatasetNotFoundError, _EpochAugment, _to_tensor

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".jfif")


# ---- image folders -----------------------------------------------------------------------------

def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    16-bit and 32-bit grey are rescaled, not clipped (PIL's `convert` clips I;16 to 255, which turns
    most of a 16-bit image white); alpha (RGBA, LA, palette with transparency) is composited on white
    rather than dropped, so transparent regions do not show arbitrary hidden colours."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 65535 -> 255
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM / DiT center crop: box-halve while >= 2x, bicubic-resize the short side to `size`, crop.
    Tiny images are upscaled by the same bicubic resize. Returns uint8 `(size, size, C)`."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y0, x0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y0:y0 + size, x0:x0 + size]


# What a broken, truncated or mislabelled file raises while PIL decodes it (zlib / struct errors
# escape PIL for some truncated PNGs); anything else is a bug and propagates.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)


INDEX_BUILDS = [0]  # folder walks done by this process (tests: the index is built once)


def _index_dir(split_dir: Path) -> Path:
    """Where a folder's index is cached: beside the data when writable (shared storage: every node and
    rank reads one copy), else the user's data cache."""
    from dmvae_study.data import fmnist
    here = split_dir.parent / ".dmvae_index"
    try:
        here.mkdir(exist_ok=True)
        probe = here / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return here
    except OSError:
        return fmnist.DATA_CACHE / "folder-index"


def folder_index(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """`[(file, label)]` of the images under `split_dir/<class>/` (sorted), built once per dataset and
    cached (JSON, written atomically) under a key of the folder, the classes and the class folders'
    modification times: every stage and rank after the first reads the cached index instead of walking
    1.28M files again; adding or removing images changes the key."""
    import hashlib
    import json

    from dmvae_study.store import atomic_write_text
    stamp = [(c, (split_dir / c).stat().st_mtime_ns) for c in classes]
    key = hashlib.sha256(json.dumps([str(split_dir.resolve()), stamp]).encode()).hexdigest()[:16]
    path = _index_dir(split_dir) / f"{split_dir.name}-{key}.json"
    if path.exists():
        try:
            return [(f, int(y)) for f, y in json.loads(path.read_text())]
        except (ValueError, OSError):
            pass  # a damaged index is rebuilt
    INDEX_BUILDS[0] += 1
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (split_dir / name).rglob("*")
                       if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        samples += [(f, label) for f in files]
    try:
        atomic_write_text(path, json.dumps(samples))
    except OSError:
        pass  # no writable cache: the next process walks again
    return samples


class ImageFolderDataset(_EpochAugment, Dataset):
    """ImageNet-style `root/<split>/<class>/**/*.{jpg,png,...}`, center-cropped to `resolution`.

    Labels are positions in `classes` (default: all class folders, sorted), so a subset given as
    `classes=[...]` is relabelled 0..k-1 in the given order. Class folders without images are kept
    (labels stay stable across splits) and warned about; no images at all raises.

    An unreadable / corrupt / truncated file is skipped: the next index that loads is returned in
    its place (deterministic), the file is warned about once, and counted in `skipped`. With loader
    worker processes each process keeps its own count."""

    def __init__(self, root: str | Path, split: str = "train", resolution: int = 256, hflip: bool = False,
                 classes: Sequence[str] | None = None, channels: int = 3, flip_seed: int = 0,
                 empty_classes: str = "warn"):
        self.root, self.split, self.resolution = Path(root).expanduser(), split, int(resolution)
        self.hflip, self.flip_seed, self.channels = hflip, flip_seed, channels
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetNotFoundError(
                f"image folder dataset not found: looked for {split_dir} (expected "
                f"<root>/{split}/<class>/<images>, e.g. ImageNet's train/ and val/ with one folder per "
                f"class). Point data.root at the dataset, e.g. --set data.root=/path/to/ImageNet")
        found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        missing = sorted(set(self.classes) - set(found))
        if missing:
            raise DatasetNotFoundError(f"class folders missing under {split_dir}: {missing[:10]}"
                                       f"{' ...' if len(missing) > 10 else ''}")
        self.samples = folder_index(split_dir, self.classes)
        counts = np.bincount([y for _, y in self.samples], minlength=len(self.classes))
        empty = [name for name, n in zip(self.classes, counts) if n == 0]
        if empty and empty_classes == "error":
            raise DatasetNotFoundError(
                f"{len(empty)} class folder(s) under {split_dir} have no images: {empty[:10]}; a class without "
                f"training images cannot be learned or sampled. Add images, or remove the folder(s) and set "
                f"data.num_classes={len(self.classes) - len(empty)}")
        if empty:
            warnings.warn(f"{len(empty)} class folder(s) under {split_dir} have no images and are skipped: "
                          f"{empty[:10]}", stacklevel=2)
        if not self.samples:
            raise DatasetNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}")
        self.targets = [y for _, y in self.samples]
        self._bad: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle (spawned loader workers)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met so far in this process."""
        return len(self._bad)

    @property
    def bad_files(self) -> list[str]:
        return sorted(self._bad)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> np.ndarray:
        with Image.open(path) as im:
            im.load()  # decode now so truncation raises here, inside the try
            im = to_rgb8(im)
            if self.channels == 1:
                im = im.convert("L")
            return center_crop_arr(im, self.resolution)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            if path in self._bad:
                continue
            try:
                arr = self._load(path)
            except _DECODE_ERRORS as e:
                with self._lock:
                    first = path not in self._bad
                    self._bad.add(path)
                if first:
                    warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
                continue
            img = _to_tensor(arr)
            return (img.flip(-1) if self._flip(index) else img), label
        raise RuntimeError(f"no readable image in {self.root / self.split} ({len(self._bad)} unreadable)")


