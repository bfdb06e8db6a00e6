"""Datasets: ImageNet-style folders, Fashion-MNIST from IDX files, procedural shapes.

Every dataset returns `(img, label)` with `img` a float tensor `(C, H, W)` in [-1, 1] and `label`
an int. Random horizontal flips are a pure function of (flip_seed, epoch, index), not of a global
RNG, so N loader workers, N Ray workers and a resumed run all see the same augmented batches.
Real data is what presets use; `SyntheticShapes` exists for unit tests that must not need data.
"""


from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset

from dmvae_study.data.common import DatasetNotFoundError
from dmvae_study.data.fmnist import (
    DATA_CACHE,
    FMNIST_CLASSES,
    FMNIST_DIRS,
    FMNIST_FILES,
    FashionMNIST,
    find_fmnist,
)
from dmvae_study.data.folder import (
    IMG_EXTENSIONS,
    ImageFolderDataset,
    center_crop_arr,
    to_rgb8,
)
from dmvae_study.data.synthetic import SyntheticShapes

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
        ds = ImageFolderDataset(root, split, res, hflip, opts.pop("classes", None), ch, flip_seed,
                                empty_classes="error" if split == "train" else "warn")
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


__all__ = ["DATASETS", "DATA_CACHE", "FMNIST_CLASSES", "FMNIST_DIRS", "FMNIST_FILES", "IMG_EXTENSIONS", "ClassSubset",
           "DatasetNotFoundError", "FashionMNIST", "ImageFolderDataset", "SyntheticShapes", "balanced_subset",
           "build_dataset", "center_crop_arr", "class_subset", "dataset_targets", "find_fmnist", "to_rgb8"]
