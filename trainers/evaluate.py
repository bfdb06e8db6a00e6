"""Stage 7: metrics of a row (paper Sec. 5): PSNR and rFID of validation reconstructions; gFID-N
and IS of stage-2 samples with the configured sampler (default: SDE, 250 steps, no CFG) and
class-balanced labels (official `sample_50k.py`); sample diversity within class as DP-DMD measures
it, on features and on latents (exposes mode collapse); reconstruction and sample grids as PNG.
Every FID-type figure is named by its feature extractor (`rfid_lite0`, `gfid_inception`, ...) and
computed through `metrics.batch_features` (clean-fid's resize), the path the metric tests check.
The gFID reference is every training image, or a class-balanced random subset (`eval.gfid_ref_images`),
cached once per dataset and extractor; random-init weights are flagged in the summary.

Every rank works: the validation images, the samples and the reference images are cut into batches of
`eval.batch_size` that do not depend on the number of ranks, rank r takes batches r, r + N, ...; each sample
batch draws its noise from a generator seeded by its index; the main rank gathers the per-batch results and
reduces them in batch order. N ranks therefore give the metrics of one, bit for bit
(tests/test_distributed_stages.py), and no rank waits at a barrier for more than the metric arithmetic."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dmvae_study import metrics
from dmvae_study.build import build_dit, for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import balanced_subset, build_dataset, dataset_targets
from dmvae_study.loaders import hash_seed
from dmvae_study.pipeline import LaunchOptions, artifact, final_tokenizer, is_baseline, store_of
from dmvae_study.samplers import Sampler
from dmvae_study.store import ArtifactDir, atomic_write_text, load_torch
from trainers.common import StageContext, run_stage
from trainers.latents import all_gather, encode_shards, gather_to_main, shard_index


class Features:
    """A metrics.FIDExtractor applied to [-1, 1] images through `metrics.batch_features`."""

    def __init__(self, name: str, cfg: ExperimentConfig, device: torch.device):
        self.ext = metrics.fid_extractor(name, device, cfg.run.weights_dir)
        self.name, self.weights_source, self.device = name, self.ext.weights_source, device

    def features(self, img: torch.Tensor) -> torch.Tensor:
        return metrics.batch_features(img, self.ext, self.device)

    def features_and_probs(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return metrics.batch_features(img, self.ext, self.device, probs=True)


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Images `(N, C, H, W)` in [-1, 1] to one PNG."""
    from torchvision.utils import save_image
    save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, str(path), nrow=nrow)


def _batches(n: int, bs: int, rank: int = 0, world: int = 1) -> list[tuple[int, range]]:
    """`(b, positions)` of the batches `b = rank, rank + world, ...` of `range(n)` cut into batches of `bs`:
    the batches do not depend on the number of ranks, only who computes them does."""
    return [(b, range(s, min(s + bs, n))) for b, s in enumerate(range(0, n, bs)) if b % world == rank]


def _loader(cfg: ExperimentConfig, ds, batches: list[tuple[int, range]]) -> DataLoader:
    """`(img (b, C, H, W), y (b,))` of each of `batches` (dataset items), read by `data.num_workers` processes."""
    return DataLoader(ds, batch_sampler=[list(r) for _, r in batches],
                      num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(0))


def _in_batch_order(gathered: list[dict[int, dict[str, Any]]] | None) -> dict[str, Any] | None:
    """Per-batch results `{b: {key: tensor or value}}` of every rank (`gather_to_main`) as one dict in batch
    order: tensors concatenated, other values listed (sums over them then run in the one-rank order).
    None (off the main rank) stays None."""
    if gathered is None:
        return None
    merged = {b: p for part in gathered for b, p in part.items()}
    rows = [merged[b] for b in sorted(merged)]
    keys = rows[0].keys() if rows else []
    return {k: torch.cat([r[k] for r in rows]) if torch.is_tensor(rows[0][k]) else [r[k] for r in rows] for k in keys}


@torch.no_grad()
def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    """Every rank reconstructs and samples its share of the batches (`_batches`) and extracts their features;
    the main rank gathers them in batch order and computes the metrics, so N ranks give the numbers of one."""
    cfg = ctx.cfg
    ev, dev = cfg.eval, ctx.device
    tok = for_inference(load_tokenizer(artifact(cfg, final_tokenizer(cfg)), dev))
    ext = Features(ev.extractor, cfg, dev)
    tag = ext.name
    # Reconstruction: PSNR and rFID on held-out images.
    val = build_dataset(cfg.data, "val")
    batches = _batches(min(ev.rfid_images, len(val)), ev.batch_size, ctx.rank, ctx.world)
    parts: dict[int, dict[str, Any]] = {}
    for (b, _), (img, _) in zip(batches, _loader(cfg, val, batches)):
        img = img.to(dev)
        with ctx.autocast():
            rec = tok.decode(tok.encode(img)).float().clamp(-1, 1)
        parts[b] = {"psnr_sum": float(metrics.psnr(rec, img, data_range=2.0)) * img.shape[0],
                    "real": ext.features(img).cpu(), "rec": ext.features(rec).cpu()}
        if b == 0:
            k = min(ev.grid_images, img.shape[0])
            save_grid(torch.cat([img[:k], rec[:k]]).cpu(), art.file("reconstructions.png"))
    recon = _in_batch_order(gather_to_main(ctx, parts))
    # Generation: samples of the stage-2 DiT, decoded, against training-set statistics.
    shape = tuple(artifact(cfg, "latents").summary()["shape"])
    net = build_dit(cfg.generator, shape, cfg.data.num_classes).to(dev).eval()
    net.load_state_dict(load_torch(artifact(cfg, "generator").file("generator.pt")))
    gen = generate(cfg, ctx, net, tok, ext, ev.gfid_samples, shape, shared=True)
    ref_f = reference_features(cfg, ext, ctx)
    if ctx.is_main:
        summary: dict[str, Any] = {}
        psnr_sum = 0.0
        for v in recon["psnr_sum"]:  # batch order, as one rank sums
            psnr_sum += v
        summary["psnr"] = psnr_sum / recon["real"].shape[0]
        summary[f"rfid_{tag}"] = metrics.fid_from_features(recon["real"], recon["rec"])
        save_grid(gen["images"], art.file("samples.png"))
        summary[f"gfid_{tag}"] = metrics.fid_from_features(ref_f, gen["features"])
        summary.update({"gfid_samples": int(gen["features"].shape[0]), "gfid_ref_images": int(ref_f.shape[0]),
                        f"is_{tag}": metrics.inception_score(probs=gen["probs"])[0],
                        f"diversity_{tag}": _diversity(gen["features"], gen["labels"]),
                        "latent_diversity": _diversity(gen["latents"], gen["labels"]),
                        "extractor": tag, "extractor_weights": ext.weights_source,
                        "random_init": bool(ext.weights_source == "random-init" or tok_random(cfg)),
                        "world": ctx.world})
        art.mark_done(summary)
    ctx.barrier()  # the others wait only for the metrics of gathered features (seconds)
    return art.summary()


def _diversity(x: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Within-class diversity, or None when no class has two samples (gfid_samples < 2 x classes)."""
    return metrics.diversity(x, labels) if int(torch.bincount(labels).max()) >= 2 else None


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """`(n,)` labels `0, 1, ..., C-1, 0, 1, ...`: every class `n // C` or `n // C + 1` times (official
    `sample_50k.py`: 50 per class for 50k ImageNet samples)."""
    return torch.arange(n) % max(num_classes, 1)


@torch.no_grad()
def generate(cfg: ExperimentConfig, ctx: StageContext, net: torch.nn.Module, tok: torch.nn.Module, ext: Features,
             n: int, shape: tuple[int, ...], seed_offset: int = 4242,
             shared: bool = False) -> dict[str, torch.Tensor] | None:
    """`n` class-conditional samples (class-balanced labels) with the configured sampler, decoded; returns
    their features `(n, D)`, class probabilities `(n, K)`, labels `(n,)`, flattened latents `(n, C*h*w)` and
    the first grid of images. Batch b (samples `b * B ...`, B = `eval.batch_size`) draws its noise and the
    sampler's noise from its own generator seeded by (seed, seed_offset, b), so the samples do not depend on
    who computes them. `shared`: every rank of `ctx` calls this and computes its share of the batches; the
    main rank gets all samples, the others None. Else this process computes all `n` alone."""
    ev, dev = cfg.eval, ctx.device
    rank, world = (ctx.rank, ctx.world) if shared else (0, 1)
    sampler = Sampler(kind=ev.sampler, steps=ev.sampler_steps, cfg_scale=ev.cfg_scale)
    labels = balanced_labels(n, cfg.data.num_classes)
    parts: dict[int, dict[str, torch.Tensor]] = {}
    grid = None
    from tqdm.auto import tqdm
    for b, r in tqdm(_batches(n, ev.batch_size, rank, world), desc=f"{ctx.stage}: {n} samples", leave=False,
                     disable=os.environ.get("DMVAE_NO_PROGRESS") == "1" or not ctx.is_main or ctx.opts.ray):
        g = torch.Generator().manual_seed(hash_seed(cfg.run.seed, "samples", seed_offset, b))
        y = labels[r.start:r.stop]
        noise = torch.randn((len(y), *shape), generator=g)
        with ctx.autocast():
            z = sampler(net, noise.to(dev), y.to(dev), generator=g).float()
            img = tok.decode(tok.denormalize(z)).float().clamp(-1, 1)
        feats, probs = ext.features_and_probs(img)
        parts[b] = {"features": feats.cpu(), "probs": probs.cpu(), "labels": y, "latents": z.flatten(1).cpu()}
        grid = img[: ev.grid_images].cpu() if b == 0 else grid
    out = _in_batch_order(gather_to_main(ctx, parts) if shared else [parts])
    return None if out is None else {**out, "images": grid}


def reference_features(cfg: ExperimentConfig, ext: Features, ctx: StageContext | None = None) -> torch.Tensor | None:
    """gFID's reference side `(N, D)`: features of every training image, or of a class-balanced random subset
    of `eval.gfid_ref_images` (never the first N of a class-sorted folder), cached once per dataset and
    extractor in the study's store: every row of a study shares them. With `ctx`, every rank of it calls
    this and extracts its share of the images (`encode_shards`: resumable shards); the main rank gets the
    features, the others None. Without, this process does all of it."""
    ctx = ctx or StageContext(cfg=cfg, stage="eval", device=ext.device)
    n = cfg.eval.gfid_ref_images
    art = store_of(cfg).artifact("fid_ref", {"data": cfg.data.to_dict(), "extractor": ext.name, "n": n,
                                             "seed": cfg.run.seed, "rule": "balanced"})
    # One decision for all ranks (another row may finish the same artifact meanwhile).
    if not all(all_gather(ctx, art.done)):
        train = build_dataset(cfg.data, "train", hflip=False)
        idx = list(range(len(train))) if n is None or n >= len(train) else \
            balanced_subset(dataset_targets(train), n, seed=cfg.run.seed)
        paths = encode_shards(ctx, art, train, idx, cfg.eval.batch_size, lambda img, y: (ext.features(img), y),
                              prefix="features", half=False, source=f"{ext.name}:{ext.weights_source}")
        if ctx.is_main:
            shards, _ = shard_index(paths)
            atomic_write_text(art.file("index.json"), json.dumps({"count": len(idx), "shards": shards}, indent=1))
            art.mark_done({"count": len(idx), "extractor": ext.name, "indices_head": idx[:8]})
    if not ctx.is_main:
        return None
    if not art.file("index.json").exists():  # cached by the one-process version of this stage
        return load_torch(art.file("features.pt"))
    shards = json.loads(art.file("index.json").read_text())["shards"]
    return torch.cat([torch.from_numpy(np.load(art.file(s["file"]))) for s in shards])


def tok_random(cfg: ExperimentConfig) -> bool:
    """Whether any network behind this row ran on random-init weights (flagged in every table):
    the tokenizer's backbone or VA-VAE features, or the prior's feature backbone / tokenizer."""
    sources = [str(v) for k, v in artifact(cfg, "tokenizer").summary().items() if k.endswith("_weights")]
    if not is_baseline(cfg):
        meta = artifact(cfg, "reference").file("meta.json")
        if meta.exists():
            sources.append(str(json.loads(meta.read_text()).get("provenance", {}).get("weights_source", "")))
    return any("random-init" in s for s in sources)


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Evaluate this row (reused when its artifact is finished)."""
    return run_stage("eval", cfg, opts)
