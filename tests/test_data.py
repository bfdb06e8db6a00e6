"""Datasets: Fashion-MNIST from the Debian IDX files, image folders with awkward files, subsets, loaders."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae_study import data as D

HAS_FMNIST = all((D.FMNIST_DIRS[0] / f"{s}.gz").is_file() for pair in D.FMNIST_FILES.values() for s in pair)
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")


# ---- Fashion-MNIST ---------------------------------------------------------------------------------

@needs_fmnist
def test_fmnist_counts_classes_and_range():
    tr, te = D.FashionMNIST(split="train"), D.FashionMNIST(split="val")
    assert (len(tr), len(te)) == (60000, 10000)
    assert len(D.FashionMNIST.classes) == 10 and D.FashionMNIST.classes[9] == "Ankle boot"
    assert sorted(tr.targets.unique().tolist()) == list(range(10))
    assert torch.bincount(te.targets).tolist() == [1000] * 10     # the test split is balanced
    img, y = tr[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32 and isinstance(y, int)
    assert img.min() >= -1 and img.max() <= 1 and img.min() == -1   # black background maps to -1


@needs_fmnist
def test_fmnist_resolution_channels_and_fit():
    raw = D.FashionMNIST(split="val")
    r32 = D.FashionMNIST(split="val", resolution=32, channels=3)
    assert r32[5][0].shape == (3, 32, 32) and torch.equal(r32[5][0][0], r32[5][0][2])
    pad = D.FashionMNIST(split="val", resolution=36, channels=1, fit="pad")
    p = pad[5][0]
    assert p.shape == (1, 36, 36) and torch.equal(p[:, 4:32, 4:32], raw[5][0]) and (p[:, :4] == -1).all()
    assert torch.allclose(D.FashionMNIST(split="val", resolution=14)[5][0].mean(), raw[5][0].mean(), atol=0.02)
    with pytest.raises(ValueError, match="pad"):
        D.FashionMNIST(split="val", resolution=16, fit="pad")


@needs_fmnist
def test_fmnist_flip_is_deterministic_per_epoch():
    a = D.FashionMNIST(split="val", hflip=True)
    b = D.FashionMNIST(split="val", hflip=True)
    plain = D.FashionMNIST(split="val")
    flips = [not torch.equal(a[i][0], plain[i][0]) for i in range(200)]
    assert 60 < sum(flips) < 140
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(20))
    b.set_epoch(1)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(20))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def test_fmnist_raw_idx_from_root_takes_precedence(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for img_stem, lbl_stem in D.FMNIST_FILES.values():
        _write_idx(tmp_path / img_stem, imgs)            # uncompressed IDX
        _write_idx(tmp_path / lbl_stem, np.array([7, 8, 9]))
    ds = D.FashionMNIST(root=tmp_path, split="train")
    assert len(ds) == 3 and ds[2][1] == 9 and ds.root == tmp_path
    assert torch.equal(ds.images[1], torch.from_numpy(imgs[1].astype(np.uint8)))


def test_fmnist_missing_error_names_places(tmp_path, monkeypatch):
    from dmvae_study.data import fmnist
    monkeypatch.setattr(fmnist, "FMNIST_DIRS", (tmp_path / "usr-share",))
    monkeypatch.setattr(fmnist, "DATA_CACHE", tmp_path / "cache")
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.FashionMNIST(root=tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "usr-share") in msg
    assert isinstance(e.value, FileNotFoundError)


# ---- image folders ---------------------------------------------------------------------------------

def _png16_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot create one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    t = tmp_path / "train"
    for c in ("a_cat", "b_dog", "c_empty"):
        (t / c).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(t / "a_cat" / "00_rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(t / "a_cat" / "01_grey.png")
    Image.new("CMYK", (33, 31), (0, 255, 0, 0)).save(t / "a_cat" / "02_cmyk.jpg", quality=100)
    Image.fromarray(np.full((20, 24), 32896, np.uint16)).save(t / "a_cat" / "03_grey16.png")   # 32896 = 128 * 257
    (t / "a_cat" / "04_corrupt.jpg").write_bytes(b"definitely not a jpeg" * 10)
    _png16_rgb(t / "b_dog" / "00_rgb16.png", np.stack([np.full((9, 9), v, np.uint16) for v in (65535, 0, 32896)], -1))
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(t / "b_dog" / "01_rgba.png")            # fully transparent
    p = Image.new("P", (12, 12), 0)
    p.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    p.save(t / "b_dog" / "02_palette.png", transparency=0)
    Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)).save(t / "b_dog" / "03_tiny.png")
    good = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(t / "b_dog" / "04_truncated.png")
    full = (t / "b_dog" / "04_truncated.png").read_bytes()
    (t / "b_dog" / "04_truncated.png").write_bytes(full[: len(full) // 2])
    (t / "b_dog" / "05_notes.txt").write_text("not an image")       # ignored by extension
    return tmp_path


def _names(ds: D.ImageFolderDataset) -> list[str]:
    return [Path(p).name for p, _ in ds.samples]


def test_folder_converts_modes_and_skips_corrupt(folder):
    with pytest.warns(UserWarning, match="c_empty"):
        ds = D.ImageFolderDataset(folder, "train", resolution=16)
    assert ds.classes == ["a_cat", "b_dog", "c_empty"] and len(ds) == 10
    names = _names(ds)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]   # twice: warn once per file
    skip_msgs = [str(w.message) for w in rec if "skipping unreadable image" in str(w.message)]
    assert len(skip_msgs) == 2 and any("04_corrupt.jpg" in m for m in skip_msgs)
    assert any("04_truncated.png" in m for m in skip_msgs)
    assert ds.skipped == 2 and {Path(p).name for p in ds.bad_files} == {"04_corrupt.jpg", "04_truncated.png"}
    for img, y in items:
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and -1 <= img.min() <= img.max() <= 1
    by = {n: items[i][0] for i, n in enumerate(names)}
    # a corrupt item is replaced by the next readable one (deterministically)
    assert torch.equal(by["04_corrupt.jpg"], by["00_rgb16.png"]) and items[names.index("04_corrupt.jpg")][1] == 1
    mid = 128 / 127.5 - 1
    assert torch.allclose(by["03_grey16.png"], torch.full((3, 16, 16), mid), atol=1e-6)  # scaled, not clipped
    assert torch.allclose(by["00_rgb16.png"].mean((1, 2)), torch.tensor([1.0, -1.0, mid]), atol=1e-6)
    assert torch.allclose(by["01_rgba.png"], torch.ones(3, 16, 16))       # transparent -> white, not red
    assert torch.allclose(by["02_palette.png"], torch.ones(3, 16, 16))    # transparent palette index -> white
    cmyk = by["02_cmyk.jpg"].mean((1, 2))
    assert cmyk[0] > 0.8 and cmyk[1] < -0.8 and cmyk[2] > 0.8             # CMYK magenta -> RGB magenta
    grey = by["01_grey.png"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert by["03_tiny.png"].std() > 0                                     # 3x5 upscaled, not blank


def test_folder_class_selection_channels_and_flip(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = D.ImageFolderDataset(folder, "train", resolution=8, classes=["b_dog"], channels=1, hflip=True)
        plain = D.ImageFolderDataset(folder, "train", resolution=8, classes=["b_dog"], channels=1)
    assert ds.classes == ["b_dog"] and set(ds.targets) == {0} and len(ds) == 5
    assert ds[0][0].shape == (1, 8, 8)
    flipped = [not torch.equal(ds[i][0], plain[i][0]) for i in (0, 1, 3)]
    assert all(torch.equal(ds[i][0], plain[i][0].flip(-1)) for i, f in zip((0, 1, 3), flipped) if f)


def test_folder_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.ImageFolderDataset(tmp_path / "ImageNet", "train", 32)
    msg = str(e.value)
    assert str(tmp_path / "ImageNet" / "train") in msg and "data.root" in msg
    (tmp_path / "x" / "val" / "empty").mkdir(parents=True)
    with pytest.raises(D.DatasetNotFoundError, match="no images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.ImageFolderDataset(tmp_path / "x", "val", 32)
    with pytest.raises(D.DatasetNotFoundError, match="zebra"):
        D.ImageFolderDataset(tmp_path / "x", "val", 32, classes=["zebra"])


# ---- subsets, builder, loaders ---------------------------------------------------------------------

@needs_fmnist
def test_class_subset_deterministic_and_relabel():
    ds = D.FashionMNIST(split="val")
    a, b = D.class_subset(ds, [3, 1]), D.class_subset(ds, [3, 1])
    assert a.indices == b.indices and a.indices == sorted(a.indices) and len(a) == 2000
    assert {a[i][1] for i in range(0, 2000, 97)} == {1, 3}
    r = D.class_subset(ds, [3, 1], relabel=True)
    assert r[0][1] == (0 if ds.targets[r.indices[0]] == 3 else 1) and set(r.targets) == {0, 1}


def test_synthetic_shapes_deterministic():
    a, b = D.SyntheticShapes(16, 24, num_classes=5), D.SyntheticShapes(16, 24, num_classes=5)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(16))
    assert [a[i][1] for i in range(6)] == [0, 1, 2, 3, 4, 0] and a[0][0].shape == (3, 24, 24)
    assert not torch.equal(a[0][0], D.SyntheticShapes(16, 24, 5, split="val")[0][0])
    sub = D.class_subset(a, [2])
    assert [sub[i][1] for i in range(len(sub))] == [2, 2, 2]


def test_build_dataset_from_config_and_name():
    from dmvae_study.config import DataConfig
    ds = D.build_dataset(DataConfig(dataset="synthetic", resolution=16, num_classes=3, train_limit=10), "train")
    assert len(ds) == 10 and ds[0][0].shape == (3, 16, 16)
    val = D.build_dataset(DataConfig(dataset="synthetic", resolution=16, num_classes=3), "val")
    assert val.hflip is False and len(val) == 128
    assert D.build_dataset("synthetic", n=8, resolution=8, channels=1)[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.build_dataset("cifar")
    with pytest.raises(TypeError, match="unused"):
        D.build_dataset("synthetic", colour="red")
    if HAS_FMNIST:
        fm = D.build_dataset(DataConfig(dataset="fmnist", resolution=32, channels=3, val_limit=50), "val")
        assert len(fm) == 50 and fm[0][0].shape == (3, 32, 32)


def test_step_loader_is_seeded_resumable_and_rank_sharded():
    from dmvae_study.loaders import GlobalBatches, step_loader
    ds = D.SyntheticShapes(40, 8, 4)
    gb = lambda rank=0, world=1: GlobalBatches(40, 4, seed=3, stage="tok", rank=rank, world=world)  # noqa: E731
    full = [b[1].tolist() for b in step_loader(ds, gb(), 0, 25)]
    assert full == [b[1].tolist() for b in step_loader(ds, gb(), 0, 25)] and len(full) == 25
    assert [b[1].tolist() for b in step_loader(ds, gb(), 13, 25)] == full[13:]          # resume mid-epoch
    assert full[:10] != full[10:20]                                                      # a new shuffle per epoch
    epoch0 = sorted(i for s in range(10) for i in gb().indices(s).tolist())
    assert epoch0 == list(range(40))                                                     # an epoch covers the data
    halves = [[i for s in range(10) for i in gb(r, 2).indices(s).tolist()] for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) + len(halves[1]) == 40


def test_flips_are_redrawn_every_epoch_through_the_loader():
    """The epoch reaches the dataset through the loader (also in worker processes), so an image's flip
    changes across epochs; a resumed loader reproduces it."""
    from dmvae_study.loaders import GlobalBatches, step_loader
    ds = D.SyntheticShapes(8, 8, 2, hflip=True)
    batches = GlobalBatches(8, 8, seed=0, stage="tok")  # one step = one epoch, every image once
    imgs = [b[0] for b in step_loader(ds, batches, 0, 6)]
    order = [batches.indices(s) for s in range(6)]
    by_item = [{int(i): imgs[s][k] for k, i in enumerate(order[s])} for s in range(6)]
    plain = {i: by_item[0][i] for i in range(8)}
    changes = sum(not torch.equal(by_item[s][i], plain[i]) for s in range(1, 6) for i in range(8))
    assert changes > 0, "flips never changed across epochs"
    workers = [b[0] for b in step_loader(ds, batches, 0, 6, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(imgs, workers))
    resumed = [b[0] for b in step_loader(ds, batches, 3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(imgs[3:], resumed))


def _index_builds(root: str) -> int:
    from dmvae_study.data import folder
    ds = D.build_dataset("folder", root=root, resolution=8)
    assert len(ds) == 6
    return folder.INDEX_BUILDS[0]


def test_folder_index_is_built_once_across_stages_and_ranks(tmp_path):
    """The first stage walks the folder and caches its index (keyed by the folder, classes and their
    modification times); later stages and other ranks (processes) read it; adding an image rebuilds it."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from dmvae_study.data import folder
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    before = folder.INDEX_BUILDS[0]
    assert _index_builds(str(tmp_path)) == before + 1   # stage 1 walks the folder
    assert _index_builds(str(tmp_path)) == before + 1   # stage 2 reads the cached index
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:  # two more ranks
        assert list(ex.map(_index_builds, [str(tmp_path)] * 2)) == [0, 0]
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "new.png")
    ds = D.build_dataset("folder", root=str(tmp_path), resolution=8)
    assert len(ds) == 7 and folder.INDEX_BUILDS[0] == before + 2  # a changed folder is walked again
