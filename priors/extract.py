"""Sharded, resumable feature extraction for the data-derived priors (paper Sec. 4, Category 1).

`extract` runs an encoder over a dataset of `(input, label)` items in shards of
`prior.shard_size` items (fewer when that would exceed ~1 GiB), batches of `prior.batch_size`.
Shard i goes to `<art>/feat-0000i.pt` (`{"x": (n, D, h, w) float16, float32 where float16 would
overflow, "y": (n,) int64, "source": str}`, atomic and checksummed) and is computed by rank
`i % world`. A rerun skips every shard that is on disk, verifies and came from the same weights
(`source`), so a killed extraction resumes at the missing shards. Rank 0 then reduces (Sec. 3.2)
and standardises everything (`reference_from_shards`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset, dataset_targets
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import load_torch, save_torch
from priors.reduce import reduce_chunks
from priors.registry import BuildContext, HandedOff, latent_grid, wait_for

log = logging.getLogger(__name__)

FEATURE_SHARD_BYTES = 1 << 30  # raw feature shards stay near 1 GiB (DINOv2-L at 16x16: 2048 images)


@dataclass
class FeatureShards:
    """Feature shards on disk, iterated in order as `(x (n, D, h, w) float32, y (n,))`."""

    paths: list[Path]
    counts: list[int]             # items per shard

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for p in self.paths:
            s = load_torch(p)
            yield s["x"].float(), s["y"]

    def features(self) -> Iterator[torch.Tensor]:
        return (x for x, _ in self)

    def labels(self) -> torch.Tensor:
        return torch.cat([load_torch(p)["y"] for p in self.paths])


@dataclass
class Items:
    """What a data prior encodes: a dataset of `(input, label)` and the dataset indices it came from."""

    dataset: Dataset
    indices: list[int]            # positions in the training set (after data.train_limit)
    labels: list[int]

    def __len__(self) -> int:
        return len(self.indices)


def _shard_ok(path: Path, n: int, source: str) -> bool:
    if not path.exists():
        return False
    try:
        s = load_torch(path)
    except Exception as e:  # corrupt or truncated: recompute it
        log.warning("feature shard %s is unreadable (%s); recomputing it", path, e)
        return False
    if s.get("source") != source or s["x"].shape[0] != n:
        log.warning("feature shard %s came from %r (%d items), not %r (%d); recomputing it",
                    path, s.get("source"), s["x"].shape[0], source, n)
        return False
    return True


def extract(ctx: BuildContext, items: Dataset, encode: Callable[[Any], torch.Tensor], *, source: str,
            item_bytes: int | None = None, desc: str = "features", prefix: str = "feat",
            keep_fp32: bool = False) -> FeatureShards:
    """Encode every item of `items` (`(input, label)` pairs) into shards; returns them on rank 0.

    `encode(batch_input) -> (b, D, h, w)`; `source` names the encoder weights and is stored with
    each shard (a shard from other weights is recomputed). A shard holds `prior.shard_size` items,
    fewer when `item_bytes` (bytes per item) would make it exceed `FEATURE_SHARD_BYTES`. Features are
    stored float16 unless that overflows or `keep_fp32` (exact latents).
    Ranks > 0 raise `HandedOff` after their shards; rank 0 waits for all (a torch.distributed
    barrier, else polling for the files)."""
    pcfg = ctx.cfg.prior
    n = len(items)  # type: ignore[arg-type]
    size = min(pcfg.shard_size, max(1, FEATURE_SHARD_BYTES // item_bytes)) if item_bytes else pcfg.shard_size
    ranges = [range(s, min(s + size, n)) for s in range(0, n, size)]
    paths = [ctx.art.file(f"{prefix}-{i:05d}.pt") for i in range(len(ranges))]
    todo = [i for i, r in enumerate(ranges) if i % ctx.world == ctx.rank and not _shard_ok(paths[i], len(r), source)]
    # One loader for all missing shards (workers persist); no batch straddles two shards.
    bs = pcfg.batch_size
    batches = [(i, list(ranges[i][j:j + bs])) for i in todo for j in range(0, len(ranges[i]), bs)]
    if batches:
        loader = DataLoader(items, batch_sampler=[b for _, b in batches], num_workers=ctx.cfg.data.num_workers)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        with tqdm(total=sum(len(b) for _, b in batches), desc=desc, unit="item", disable=not ctx.progress) as bar:
            for k, ((i, _), (inp, y)) in enumerate(zip(batches, loader)):
                with torch.inference_mode():
                    f = encode(inp).float().cpu()
                half = f if keep_fp32 else f.to(torch.float16)
                xs.append(half if torch.isfinite(half).all() else f)  # float16 halves the disk unless it overflows
                ys.append(torch.as_tensor(y, dtype=torch.int64))
                bar.update(len(ys[-1]))
                if k + 1 == len(batches) or batches[k + 1][0] != i:  # last batch of shard i
                    dtype = torch.float16 if all(t.dtype == torch.float16 for t in xs) else torch.float32
                    x = torch.cat([t.to(dtype) for t in xs])
                    save_torch(paths[i], {"x": x, "y": torch.cat(ys), "source": source})
                    xs, ys = [], []
    if ctx.world > 1:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not ctx.is_main:
            raise HandedOff
        wait_for(paths, f"{len(paths)} feature shards from {ctx.world} ranks")
    return FeatureShards(paths, [len(r) for r in ranges])


# ---- image items and backbones --------------------------------------------------------------------

def backbone_tokenizer_needs(backbone: Callable[[ExperimentConfig], str]):
    """`needs` of an image-backbone prior: with `prior.reduction=tokenizer`, the tokenizer whose latents
    are the reference (App. A.2): the row's own tokenizer when its backbone is the prior's backbone
    (the paper's DINO row: DMD then starts at the reference), else a tokenizer of the same recipe
    (A.1) with the prior's backbone, frozen."""
    def needs(cfg: ExperimentConfig):
        if cfg.prior.reduction != "tokenizer":
            return {}
        name = backbone(cfg)
        # Another backbone: its own default feature layer (the row's `backbone_layer` names a layer of
        # the row's backbone, e.g. Lite0's block10 in the mini preset, which ResNet-34 does not have).
        tok = cfg.tokenizer if cfg.tokenizer.backbone == name else cfg.tokenizer.replace(
            backbone=name, freeze_backbone=True, backbone_layer=None)
        return {"tokenizer": ("tokenizer", cfg.replace(tokenizer=tok))}
    return needs


def training_items(ctx: BuildContext, classes: Sequence[int] | None = None) -> Items:
    """Training images (no flips) `(img (C, H, W) in [-1, 1], label)`, optionally of some classes only.

    `prior.num_samples` below the available count keeps a seeded random subset (sorted), so a
    class-sorted folder dataset (ImageNet) is not cut to its first classes."""
    cfg = ctx.cfg
    ds = build_dataset(cfg.data, "train", hflip=False)
    targets = dataset_targets(ds)
    idx = list(range(len(targets)))
    if classes is not None:
        keep = set(int(c) for c in classes)
        idx = [i for i in idx if targets[i] in keep]
        if not idx:
            raise ValueError(f"no training images of classes {sorted(keep)} in {cfg.data.dataset}")
    n = cfg.prior.num_samples
    if n is not None and n < len(idx):
        pick = torch.randperm(len(idx), generator=ctx.generator("subset"))[:n].sort().values
        idx = [idx[int(j)] for j in pick]
    elif n is not None and n > len(idx):
        log.warning("prior.num_samples=%d but only %d training images are available; using %d", n, len(idx), len(idx))
    return Items(Subset(ds, idx), idx, [targets[i] for i in idx])


def grid_backbone(ctx: BuildContext, name: str,
                  **backbone_kw: Any) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A frozen backbone from `dmvae_study.backbones` whose feature map is aligned to the tokenizer
    grid `latent_grid(cfg)`: the network input is resized to `grid * stride` pixels (ViTs use patch
    `tokenizer.backbone_patch or 14`, as the paper's DINOv2-L/16 at 256 px -> 16x16; `backbone_kw`
    go to `build_backbone`, e.g. `layer="layer4"`). Returns the
    backbone and `encode(img (B, C, H, W) in [-1, 1]) -> (B, D, h, w)` on `ctx.device`."""
    from dmvae_study.backbones import build_grid_backbone
    cfg = ctx.cfg
    return build_grid_backbone(name, latent_grid(cfg), vit_patch=cfg.tokenizer.backbone_patch,
                               weights_dir=cfg.run.weights_dir, allow_random_weights=cfg.run.allow_random_weights,
                               seed=ctx.seed("backbone", name), device=ctx.device, **backbone_kw)


def reference_from_shards(ctx: BuildContext, shards: FeatureShards, num_classes: int,
                          provenance: dict[str, Any]) -> ReferenceSet:
    """Reduce the shards' features to `prior.reduced_dim` (Sec. 3.2), standardise, attach provenance."""
    codes, report = reduce_chunks(shards.features, ctx.cfg.prior, counts=shards.counts, seed=ctx.seed("reducer"),
                                  device=ctx.device, progress=ctx.progress)
    return ReferenceSet.standardised(codes, shards.labels(), num_classes=num_classes,
                                     provenance={**provenance, **report})


def backbone_prior(ctx: BuildContext, backbone: str, items: Items, backbone_kw: dict[str, Any] | None = None,
                   **provenance: Any) -> ReferenceSet:
    """Spatial features of `items` from `backbone` on the latent grid, reduced per `prior.reduction`:
    `tokenizer` (the latents of that backbone's frozen-backbone tokenizer, App. A.2) or a feature
    reducer (feature_ae / pca / none), then standardised."""
    if ctx.cfg.prior.reduction == "tokenizer":
        return tokenizer_reference(ctx, items, backbone=backbone, **provenance)
    net, encode = grid_backbone(ctx, backbone, **(backbone_kw or {}))
    h, w = latent_grid(ctx.cfg)
    shards = extract(ctx, items.dataset, encode, source=f"{backbone}:{net.weights_source}",
                     item_bytes=2 * int(net.out_channels) * h * w, desc=f"{ctx.cfg.prior.name} ({backbone})")
    prov = {"backbone": backbone, "weights_source": net.weights_source, "feature_dim": int(net.out_channels),
            "backbone_input_px": int(net.input_size), "images": len(items), **(backbone_kw or {}), **provenance}
    return reference_from_shards(ctx, shards, ctx.cfg.data.num_classes, prov)


class Flipped(Dataset):
    """`(img.flip(-1), label)` of every item of a dataset of images."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        img, y = self.dataset[i]
        return img.flip(-1), y


def tokenizer_reference(ctx: BuildContext, items: Items, **provenance: Any) -> ReferenceSet:
    """The reference set of App. A.2: "we first extract the latent representations for the entire ImageNet
    dataset using the frozen encoder and projector from the previous stage trained tokenizer".

    The tokenizer is the artifact the prior declared as its `tokenizer` input (the row's own tokenizer when
    its backbone is the prior's, so DMD starts at the reference). Latents of the training images (and of
    their flips, `prior.tokenizer_flips`) normalised with the tokenizer's own latent mean / scale, exactly
    the space the DMD stage compares (`DMVAE.to_reference`)."""
    from torch.utils.data import ConcatDataset

    from dmvae_study.build import for_inference, load_tokenizer
    art = ctx.inputs["tokenizer"]
    tok = for_inference(load_tokenizer(art, ctx.device))
    c, h, w = tok.latent_channels, *latent_grid(ctx.cfg)
    ds: Dataset = items.dataset
    if ctx.cfg.prior.tokenizer_flips:
        ds = ConcatDataset([ds, Flipped(ds)])
    shards = extract(ctx, ds, lambda img: tok.normalize(tok.encode(img.to(ctx.device))), source=f"tokenizer:{art.path.name}",
                     item_bytes=4 * c * h * w, desc=f"{ctx.cfg.prior.name} (tokenizer latents)", keep_fp32=True)
    x = torch.cat(list(shards.features()))
    summary = art.summary()
    sources = [str(v) for k, v in summary.items() if k.endswith("_weights")]
    prov = {"tokenizer": art.path.name, "weights_source": sources[0] if sources else "trained",
            "images": len(items), "flips": bool(ctx.cfg.prior.tokenizer_flips), "reducer": "tokenizer",
            "latent_mean": float(tok.latent_mean), "latent_scale": float(tok.latent_scale), **provenance}
    return ReferenceSet(x=x, y=shards.labels(), num_classes=ctx.cfg.data.num_classes, mean=float(tok.latent_mean),
                        scale=float(tok.latent_scale), provenance=prov, exact=True)
