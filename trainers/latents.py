"""The stage-2 latent cache (App. A.5): the final tokenizer's latents of every training image (and its
horizontal flip), normalised by the tokenizer's measured mean / scale, encoded once so the stage-2
DiT loop never re-runs the encoder (the official loop re-encodes every image on every step).

The cache is written by every rank at once, in shards (`encode_shards`): shard i holds images
`[i * S, (i + 1) * S)` of the training set (S = `LATENT_SHARD` rounded up to whole batches of
`eval.batch_size`, so the encoder sees the very batches of a one-process pass), each image batch
followed by its flipped batch (`generator.flip_cache`). The row order is therefore fixed by the dataset
and the batch size, never by the number of workers: per batch, its images, then their flips.
A shard is `<prefix>-0000i.npy` (`(rows, C, h, w)` float16, float32 if float16 would overflow) plus
`<prefix>-0000i.meta.pt` (labels and the shard's layout), both atomic and checksummed; a rerun keeps
every shard that verifies and recomputes the others, dealt over the ranks so a resume is balanced too.
The main rank then writes `index.json` and `labels.pt` (kilobytes to megabytes: no rank waits for it
long). `load_latents` memory-maps the shards: no rank holds a float32 copy of the cache, and ranks on
one node share the page cache."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from dmvae_study.build import for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.pipeline import LaunchOptions, input_artifact
from dmvae_study.store import ArtifactDir, atomic_write_bytes, atomic_write_text, load_torch, save_torch, verify
from dmvae_study.latent_cache import LatentCache  # noqa: F401 (read by generator / evaluate)
from trainers.common import StageContext, run_stage

log = logging.getLogger("dmvae_study")

LATENT_SHARD = 4096  # images per shard (before rounding up to whole batches): ~130 MB of fp16 32x16x16 latents + flips


# ---- collectives (a 1-worker run needs no process group) -------------------------------------------

def all_gather(ctx: StageContext, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    if ctx.world == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(ctx: StageContext, obj: Any) -> list[Any] | None:
    """`obj` of every rank, in rank order, on the main rank (None elsewhere)."""
    if ctx.world == 1:
        return [obj]
    out: list[Any] | None = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# ---- sharded, resumable encoding -------------------------------------------------------------------

def shard_plan(n: int, batch_size: int, shard_images: int | None = None) -> list[range]:
    """Positions `[0, n)` cut into shards of `shard_images` (default `LATENT_SHARD`) rounded up to whole batches."""
    size = math.ceil((shard_images or LATENT_SHARD) / batch_size) * batch_size
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _shard_paths(art: ArtifactDir, prefix: str, i: int) -> tuple[Path, Path]:
    return art.file(f"{prefix}-{i:05d}.npy"), art.file(f"{prefix}-{i:05d}.meta.pt")


def _shard_ok(art: ArtifactDir, prefix: str, i: int, layout: dict[str, Any]) -> bool:
    """Both files present, checksums verified, same layout (items, batch size, flips) as planned."""
    x_path, meta_path = _shard_paths(art, prefix, i)
    if not (x_path.exists() and meta_path.exists()):
        return False
    try:
        meta = load_torch(meta_path)
        verify(x_path)
        rows = np.load(x_path, mmap_mode="r").shape[0]
    except Exception as e:  # truncated or corrupt: recompute it
        log.warning("shard %s is unreadable (%s); recomputing it", x_path, e)
        return False
    if meta.get("layout") != layout or rows != meta["y"].shape[0]:
        log.warning("shard %s has layout %s, not %s; recomputing it", x_path, meta.get("layout"), layout)
        return False
    return True


def encode_shards(ctx: StageContext, art: ArtifactDir, dataset: Dataset, indices: Sequence[int], batch_size: int,
                  encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *,
                  prefix: str, half: bool, source: str = "") -> list[Path]:
    """Encode the dataset items `indices` on every rank at once, in resumable shards; returns the shards'
    `.npy` paths in row order, on every rank (all of them are on disk when it returns).

    Batches of `batch_size` items (a shard holds whole batches, `shard_plan`) are read by a DataLoader with
    `data.num_workers` processes; `encode(img (b, C, H, W) on the device, y (b,)) -> (x (r, ...), y (r,))`
    gives a batch's rows. `half`: float16 on disk unless a shard would overflow it. Shards already on disk
    and valid are kept; the missing ones are dealt round-robin over the ranks (balanced on a resume too),
    so the only wait is for the slowest rank's last shard."""
    plan = shard_plan(len(indices), batch_size)
    layouts = [{"items": [int(indices[r.start]), len(r)], "batch_size": batch_size, "source": source} for r in plan]
    missing_mine = [i for i in range(len(plan)) if i % ctx.world == ctx.rank
                    and not _shard_ok(art, prefix, i, layouts[i])]
    todo = sorted(i for part in all_gather(ctx, missing_mine) for i in part)[ctx.rank::ctx.world]
    batches = [(i, [int(indices[p]) for p in plan[i][j:j + batch_size]])
               for i in todo for j in range(0, len(plan[i]), batch_size)]
    if batches:
        log.info("[%s] rank %d encodes %d of %d shards", ctx.stage, ctx.rank, len(todo), len(plan))
        loader = DataLoader(dataset, batch_sampler=[b for _, b in batches], num_workers=ctx.cfg.data.num_workers,
                            pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(0))
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for k, ((i, _), (img, y)) in enumerate(zip(batches, loader)):
            x, y = encode(img.to(ctx.device, non_blocking=True), torch.as_tensor(y, dtype=torch.int64))
            xs.append(x.float().cpu())
            ys.append(y)
            if k + 1 == len(batches) or batches[k + 1][0] != i:  # last batch of shard i
                x = torch.cat(xs)
                if half and bool(torch.isfinite(x.to(torch.float16)).all()):
                    x = x.to(torch.float16)  # halves the disk; float32 only where float16 would overflow
                x_path, meta_path = _shard_paths(art, prefix, i)
                atomic_write_bytes(x_path, _npy_bytes(x.numpy()))
                save_torch(meta_path, {"y": torch.cat(ys), "layout": layouts[i]})  # written last: shard complete
                xs, ys = [], []
    ctx.barrier()  # cheap: every rank has encoded its share of the shards in parallel
    return [_shard_paths(art, prefix, i)[0] for i in range(len(plan))]


def shard_index(paths: list[Path]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """`encode_shards`' shards as index entries `{"file", "rows", "dtype"}` and their labels `(N,)` in row order."""
    heads = [np.load(p, mmap_mode="r") for p in paths]
    entries = [{"file": p.name, "rows": int(h.shape[0]), "dtype": str(h.dtype)} for p, h in zip(paths, heads)]
    return entries, torch.cat([load_torch(p.with_name(p.name[:-len(".npy")] + ".meta.pt"))["y"] for p in paths])


# ---- the stage -------------------------------------------------------------------------------------

@torch.no_grad()
def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg = ctx.cfg
    tok_art = input_artifact(cfg, "latents", "tokenizer")
    ds = build_dataset(cfg.data, "train", hflip=False)
    views = 2 if cfg.generator.flip_cache else 1
    tok: list[torch.nn.Module] = []  # loaded on the first batch: a rank with no missing shard never loads it

    def encode(img: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not tok:
            tok.append(for_inference(load_tokenizer(tok_art, ctx.device)))
        zs = []
        for v in ([img, img.flip(-1)] if views == 2 else [img]):
            with ctx.autocast():
                zs.append(tok[0].normalize(tok[0].encode(v)).float())
        return torch.cat(zs), y.repeat(views)

    paths = encode_shards(ctx, art, ds, range(len(ds)), cfg.eval.batch_size, encode, prefix="z", half=True,
                          source=f"tokenizer:{tok_art.path.name}:views={views}")
    if ctx.is_main:
        shards, y = shard_index(paths)
        shape = list(np.load(paths[0], mmap_mode="r").shape[1:])
        save_torch(art.file("labels.pt"), y)
        atomic_write_text(art.file("index.json"), json.dumps(
            {"count": int(y.shape[0]), "shape": shape, "views": views, "shards": shards}, indent=1))
        art.mark_done({"count": int(y.shape[0]), "shape": shape, "shards": len(shards)})
    ctx.barrier()  # the others wait only for the index
    return art.summary()


def load_latents(cfg: ExperimentConfig) -> tuple[LatentCache, torch.Tensor]:
    """The cached normalised latents of a finished row as a memory-mapped `(N, C, h, w)` `LatentCache`
    (rows float16 as stored: `.float()` the batch where it is used) and labels `(N,)` int64."""
    from dmvae_study.pipeline import artifact
    art = artifact(cfg, "latents")
    return LatentCache(art), load_torch(art.file("labels.pt"))


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Encode and cache this row's latents (reused when its artifact is finished)."""
    return run_stage("latents", cfg, opts)
