"""Artifact store: atomic checksummed writes, corrupt-checkpoint fallback, preflight checks."""

import warnings

import pytest
import torch

from dmvae_study.store import (ArtifactStore, CorruptArtifactError, atomic_write_bytes, load_torch,
                               preflight_writable, save_torch)


def test_atomic_write_leaves_no_temp_files_and_checksums(tmp_path):
    p = atomic_write_bytes(tmp_path / "a" / "x.bin", b"hello")
    assert p.read_bytes() == b"hello"
    assert sorted(f.name for f in p.parent.iterdir()) == ["x.bin", "x.bin.sha256"]


def test_corruption_is_detected(tmp_path):
    p = save_torch(tmp_path / "t.pt", {"w": torch.arange(10.0)})
    assert torch.equal(load_torch(p)["w"], torch.arange(10.0))
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError):
        load_torch(p)


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    art = ArtifactStore(tmp_path).artifact("stage", {"a": 1})
    art.save_checkpoint(10, {"w": torch.ones(3)})
    newest = art.save_checkpoint(20, {"w": torch.full((3,), 2.0)})
    newest.write_bytes(newest.read_bytes()[:50])  # a crash mid-copy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, state = art.load_latest_checkpoint()
    assert step == 10 and torch.equal(state["w"], torch.ones(3))
    assert any("unreadable" in str(w.message) for w in caught)


def test_keys_follow_config(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.artifact("k", {"a": 1}).path == store.artifact("k", {"a": 1}).path
    assert store.artifact("k", {"a": 1}).path != store.artifact("k", {"a": 2}).path


def test_checkpoint_pruning(tmp_path):
    art = ArtifactStore(tmp_path).artifact("stage", {})
    for s in (1, 2, 3, 4):
        art.save_checkpoint(s, {"s": torch.tensor(s)})
    assert [s for s, _ in art.checkpoints()] == [3, 4]


def test_preflight_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    with pytest.raises(PermissionError, match="not writable"):
        preflight_writable(blocker / "results")


def test_preflight_full_disk(tmp_path):
    with pytest.raises(OSError, match="MiB free"):
        preflight_writable(tmp_path, min_free_mb=10**12)


def test_atomic_writes_follow_the_umask_not_mkstemp(tmp_path):
    """Results are shared (a cluster's /shared, CI artifacts): files get 0666 & ~umask, as open() gives,
    not mkstemp's 0600."""
    from dmvae_study import store
    p = atomic_write_bytes(tmp_path / "x.bin", b"hello")
    assert p.stat().st_mode & 0o777 == 0o666 & ~store._UMASK
    assert p.stat().st_mode & 0o777 == (tmp_path / "x.bin.sha256").stat().st_mode & 0o777
