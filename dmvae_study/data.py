"""Datasets and loaders: ImageNet-style folders, Fashion-MNIST from IDX files, procedural shapes.

Every dataset returns `(img, label)` with `img` a float tensor `(C, H, W)` in [-1, 1] and `label`
an int. Random horizontal flips are a pure function of (flip_seed, epoch, index), not of a global
RNG, so N loader workers, N Ray workers and a resumed run all see the same augmented batches.
Real data is what presets use; `SyntheticShapes` exists for unit tests that must not need data.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import threading
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".jfif")
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where the Debian package `dataset-fashion-mnist` puts the IDX files; a tuple so tests can patch it.
FMNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DATA_CACHE = Path(os.environ.get("DMVAE_DATA_DIR", Path.home() / ".cache" / "dmvae_study" / "data"))


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


class ImageFolderDataset(_EpochAugment, Dataset):
    """ImageNet-style `root/<split>/<class>/**/*.{jpg,png,...}`, center-cropped to `resolution`.

    Labels are positions in `classes` (default: all class folders, sorted), so a subset given as
    `classes=[...]` is relabelled 0..k-1 in the given order. Class folders without images are kept
    (labels stay stable across splits) and warned about; no images at all raises.

    An unreadable / corrupt / truncated file is skipped: the next index that loads is returned in
    its place (deterministic), the file is warned about once, and counted in `skipped`. With loader
    worker processes each process keeps its own count."""

    def __init__(self, root: str | Path, split: str = "train", resolution: int = 256, hflip: bool = False,
                 classes: Sequence[str] | None = None, channels: int = 3, flip_seed: int = 0):
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
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in (split_dir / name).rglob("*")
                           if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            if not files:
                empty.append(name)
            self.samples += [(f, label) for f in files]
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


# ---- procedural shapes (tests only) --------------------------------------------------------------

class SyntheticShapes(_EpochAugment, Dataset):
    """Deterministic coloured shapes on a dark background: class k draws shape k (mod 8) in hue
    k / num_classes, with per-item position, size and colour jitter from (seed, split, index).
    For unit tests that need images without data files; presets use real data."""

    SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "hbar", "vbar")

    def __init__(self, n: int = 512, resolution: int = 32, num_classes: int = 4, channels: int = 3,
                 hflip: bool = False, seed: int = 0, split: str = "train", flip_seed: int = 0):
        self.n, self.resolution, self.num_classes, self.channels = n, resolution, num_classes, channels
        self.hflip, self.seed, self.split, self.flip_seed = hflip, seed, split, flip_seed
        self.classes = [f"{self.SHAPES[k % len(self.SHAPES)]}{k}" for k in range(num_classes)]
        self.targets = [i % num_classes for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        r = self.resolution
        yy, xx = np.meshgrid(np.linspace(-1, 1, r), np.linspace(-1, 1, r), indexing="ij")
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        s = rng.uniform(0.35, 0.6)
        y, x = (yy - cy) / s, (xx - cx) / s
        shape = self.SHAPES[label % len(self.SHAPES)]
        mask = {"disk": x**2 + y**2 <= 1, "square": np.maximum(abs(x), abs(y)) <= 0.8,
                "triangle": (y <= 0.8) & (y >= 2 * abs(x) - 1), "ring": abs(np.hypot(x, y) - 0.75) <= 0.25,
                "cross": (np.minimum(abs(x), abs(y)) <= 0.25) & (np.maximum(abs(x), abs(y)) <= 1),
                "diamond": abs(x) + abs(y) <= 1, "hbar": (abs(y) <= 0.3) & (abs(x) <= 1),
                "vbar": (abs(x) <= 0.3) & (abs(y) <= 1)}[shape]
        hue = (label / self.num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        colour = np.array(_hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        img = rng.uniform(0.0, 0.12, (r, r, 1)) * np.ones(3) + mask[..., None] * colour
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        t = _to_tensor(arr)
        if self.channels == 1:
            t = t.mean(0, keepdim=True)
        return (t.flip(-1) if self._flip(index) else t), label


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# ---- subsets and the builder -----------------------------------------------------------------------

def dataset_targets(dataset: Dataset) -> list[int]:
    """Labels of every item without decoding images where the dataset (or a Subset chain) exposes them."""
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    t = getattr(dataset, "targets", None)
    if t is not None:
        return [int(v) for v in (t.tolist() if torch.is_tensor(t) else t)]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


class ClassSubset(Subset):
    """Subset of some classes; with `relabel`, labels become positions in `classes` (0..k-1)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], classes: Sequence[int], relabel: bool):
        super().__init__(dataset, list(indices))
        self.classes, self.relabel = list(classes), relabel
        self._map = {c: i for i, c in enumerate(self.classes)}
        parent = dataset_targets(dataset)
        self.targets = [self._map[parent[i]] if relabel else parent[i] for i in self.indices]

    def __getitem__(self, idx):  # type: ignore[override]
        img, y = self.dataset[self.indices[idx]]
        return img, (self._map[int(y)] if self.relabel else y)

    def __getitems__(self, idx: list[int]) -> list:  # torch requires it alongside a custom __getitem__
        return [self[i] for i in idx]


def class_subset(dataset: Dataset, classes: Sequence[int], relabel: bool = False) -> Subset:
    """Items whose label is in `classes`, in ascending index order (deterministic, no RNG)."""
    keep = set(int(c) for c in classes)
    idx = [i for i, y in enumerate(dataset_targets(dataset)) if y in keep]
    if not idx:
        raise ValueError(f"no items with labels {sorted(keep)}")
    return ClassSubset(dataset, idx, [int(c) for c in classes], relabel)


DATASETS = ("fmnist", "folder", "synthetic")


def build_dataset(cfg_or_name: Any, split: str = "train", **overrides: Any) -> Dataset:
    """Dataset from a `DataConfig` (or a name from DATASETS plus keyword options).

    Options: root, resolution, channels, hflip (default: the config's value in train, off otherwise),
    limit (first N items; default the config's train_limit / val_limit), classes (folder: names),
    num_classes / n (synthetic), fit (fmnist), flip_seed."""
    if isinstance(cfg_or_name, str):
        name, opts = cfg_or_name, {}
    else:
        c = cfg_or_name
        name = c.dataset
        opts = {"root": c.root, "resolution": c.resolution, "channels": c.channels,
                "hflip": bool(c.hflip) and split == "train", "num_classes": c.num_classes,
                "limit": c.train_limit if split == "train" else c.val_limit}
    opts.update(overrides)
    limit = opts.pop("limit", None)
    root, res, ch = opts.pop("root", None), int(opts.pop("resolution", 32)), int(opts.pop("channels", 3))
    hflip, flip_seed = bool(opts.pop("hflip", False)), int(opts.pop("flip_seed", 0))
    num_classes = opts.pop("num_classes", None)
    if name == "fmnist":
        ds: Dataset = FashionMNIST(root, split, res, ch, hflip, fit=opts.pop("fit", "resize"),
                                   download=opts.pop("download", True), flip_seed=flip_seed)
        if num_classes not in (None, 10):
            raise ValueError(f"Fashion-MNIST has 10 classes, the config says num_classes={num_classes}")
    elif name == "folder":
        if root is None:
            raise DatasetNotFoundError("dataset 'folder' needs a root (data.root=/path/to/ImageNet)")
        ds = ImageFolderDataset(root, split, res, hflip, opts.pop("classes", None), ch, flip_seed)
        if num_classes is not None and len(ds.classes) != num_classes:
            raise ValueError(f"{Path(root) / split} has {len(ds.classes)} classes, the config says "
                             f"num_classes={num_classes}")
    elif name == "synthetic":
        ds = SyntheticShapes(int(opts.pop("n", 512 if split == "train" else 128)), res,
                             int(num_classes or 4), ch, hflip, int(opts.pop("seed", 0)), split, flip_seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if opts:
        raise TypeError(f"unused dataset options for {name!r}: {sorted(opts)}")
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(int(limit)))
    return ds



def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """`n` indices (sorted) with every class in equal share (+-1): a seeded random `n // C` of each class,
    one more for `n % C` randomly chosen classes; a class with too few items gives all it has and the
    rest is drawn at random from the remaining items. For reference statistics of class-sorted folders."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    n = min(n, len(targets))
    quota = {c: n // len(classes) for c in classes}
    for j in torch.randperm(len(classes), generator=g)[: n % len(classes)].tolist():
        quota[classes[j]] += 1
    picked, rest = [], []
    for c in classes:
        perm = [by_class[c][k] for k in torch.randperm(len(by_class[c]), generator=g).tolist()]
        picked += perm[: quota[c]]
        rest += perm[quota[c]:]
    if len(picked) < n:
        picked += [rest[k] for k in torch.randperm(len(rest), generator=g)[: n - len(picked)].tolist()]
    return sorted(picked)
