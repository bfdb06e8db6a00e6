"""Content-addressed artifact store with atomic, checksummed writes.

Stages hand each other artifacts (checkpoints, reference sets, latent caches) through folders
keyed by the config that produced them: `<root>/<kind>/<kind>-<digest>/`. A rerun with the same
config finds the folder (and its `DONE` marker) and reuses it; a changed config gets a new key.
Every file is written to a temporary name, fsynced, then renamed, with a `.sha256` sidecar, so a
crash never leaves a half-written file under a final name, and a corrupt file is detected on load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")


class CorruptArtifactError(RuntimeError):
    """A file's bytes do not match its recorded checksum (truncated or corrupted on disk)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes, checksum: bool = True) -> Path:
    """Write `data` to `path` atomically (temp file, fsync, rename); add `<path>.sha256` if asked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared (cluster, CI artifacts)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if checksum:
            side = path.with_name(path.name + ".sha256")
            stmp = side.with_name(f".{side.name}.tmp")
            stmp.write_text(sha256_bytes(data) + "\n")
            os.replace(stmp, side)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, checksum: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode(), checksum=checksum)


def verify(path: str | Path) -> None:
    """Raise CorruptArtifactError when `path` does not match its `.sha256` sidecar (if it has one)."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if side.exists():
        want = side.read_text().strip()
        got = sha256_file(path)
        if want != got:
            raise CorruptArtifactError(f"{path} is corrupt: sha256 {got[:12]} != recorded {want[:12]}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSONL log (a stage's `metrics.jsonl`), in file order; blank lines and a torn
    line (a crash mid-write) are skipped."""
    recs = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


def save_torch(path: str | Path, obj: Any) -> Path:
    """torch.save to bytes, then an atomic checksummed write (tensors and plain containers only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Checksum-verified `torch.load(weights_only=True)`: never unpickles arbitrary objects."""
    verify(path)
    return torch.load(path, map_location=map_location, weights_only=True)


class ArtifactDir:
    """One artifact's folder: resolved config, checkpoints, result files and the DONE marker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ArtifactDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- config and completion -----------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        atomic_write_text(self.path / "DONE", json.dumps(summary or {}, sort_keys=True, default=str))

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "DONE").read_text()) if self.done else {}

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.path.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := CKPT_RE.match(p.name))]
        return sorted(found)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        """Atomically write `ckpt-<step>.pt` and prune all but the newest `keep` checkpoints."""
        path = save_torch(self.path / f"ckpt-{step:09d}.pt", state)
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self, map_location: str | torch.device = "cpu") -> tuple[int, dict] | None:
        """Newest checkpoint that verifies and loads; a corrupt one is skipped with a warning."""
        for step, path in reversed(self.checkpoints()):
            try:
                return step, load_torch(path, map_location)
            except Exception as e:  # truncated zip, bad checksum, unpickling refusal
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, e)
                import warnings
                warnings.warn(f"checkpoint {path} is unreadable ({e}); using the previous good one",
                              stacklevel=2)
        return None

    @contextlib.contextmanager
    def lock(self):
        """Exclusive advisory lock on this artifact across processes (concurrent Tune trials that need
        the same shared artifact: the second waits, then finds it DONE)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ArtifactStore:
    """`<root>/<kind>/<kind>-<digest>/` folders, keyed by the config that produced them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def artifact(self, kind: str, key_config: dict[str, Any] | str) -> ArtifactDir:
        digest = key_config if isinstance(key_config, str) else config_digest(key_config)
        return ArtifactDir(self.root / kind / f"{kind}-{digest}")


def config_digest(cfg: dict[str, Any], n: int = 12) -> str:
    return sha256_bytes(json.dumps(cfg, sort_keys=True, default=str).encode())[:n]


def preflight_writable(path: str | Path, min_free_mb: int = 200) -> None:
    """Fail before any training when the results location is read-only or nearly full."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"results location {path} is not writable ({e.strerror}); "
                              f"choose another with --out DIR or fix its permissions") from None
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"results location {path} has only {free_mb:.0f} MiB free (< {min_free_mb} MiB); "
                      f"free space or choose another with --out DIR")
