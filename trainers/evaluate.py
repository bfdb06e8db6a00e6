"""Stage 7: metrics of a row (paper Sec. 5): PSNR and rFID of validation reconstructions; gFID-N
and IS of stage-2 samples with the configured sampler (default: SDE, 250 steps, no CFG) and
class-balanced labels (official `sample_50k.py`); sample diversity within class as DP-DMD measures
it, on features and on latents (exposes mode collapse); reconstruction and sample grids as PNG.
Every FID-type figure is named by its feature extractor (`rfid_lite0`, `gfid_inception`, ...) and
computed through `metrics.batch_features` (clean-fid's resize), the path the metric tests check.
The gFID reference is every training image, or a class-balanced random subset (`eval.gfid_ref_images`),
cached once per dataset and extractor; random-init weights are flagged in the summary."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from dmvae_study import metrics
from dmvae_study.build import build_dit, for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import balanced_subset, build_dataset, dataset_targets
from dmvae_study.pipeline import LaunchOptions, artifact, final_tokenizer, is_baseline, store_of
from dmvae_study.samplers import Sampler
from dmvae_study.store import ArtifactDir, load_torch, save_torch
from trainers.common import StageContext, run_stage


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


def _batches(ds, indices: list[int], bs: int):
    for start in range(0, len(indices), bs):
        items = [ds[i] for i in indices[start:start + bs]]
        yield torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


@torch.no_grad()
def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg = ctx.cfg
    if ctx.is_main:
        ev, dev = cfg.eval, ctx.device
        tok = for_inference(load_tokenizer(artifact(cfg, final_tokenizer(cfg)), dev))
        ext = Features(ev.extractor, cfg, dev)
        tag = ext.name
        summary: dict[str, Any] = {}
        # Reconstruction: PSNR and rFID on held-out images.
        val = build_dataset(cfg.data, "val")
        real_f, rec_f, psnr_sum = [], [], 0.0
        for i, (img, _) in enumerate(_batches(val, list(range(min(ev.rfid_images, len(val)))), ev.batch_size)):
            img = img.to(dev)
            with ctx.autocast():
                rec = tok.decode(tok.encode(img)).float().clamp(-1, 1)
            psnr_sum += float(metrics.psnr(rec, img, data_range=2.0)) * img.shape[0]
            real_f.append(ext.features(img).cpu())
            rec_f.append(ext.features(rec).cpu())
            if i == 0:
                k = min(ev.grid_images, img.shape[0])
                save_grid(torch.cat([img[:k], rec[:k]]).cpu(), art.file("reconstructions.png"))
        summary["psnr"] = psnr_sum / sum(f.shape[0] for f in real_f)
        summary[f"rfid_{tag}"] = metrics.fid_from_features(torch.cat(real_f), torch.cat(rec_f))
        # Generation: samples of the stage-2 DiT, decoded, against training-set statistics.
        shape = tuple(artifact(cfg, "latents").summary()["shape"])
        net = build_dit(cfg.generator, shape, cfg.data.num_classes).to(dev).eval()
        net.load_state_dict(load_torch(artifact(cfg, "generator").file("generator.pt")))
        gen = generate(cfg, ctx, net, tok, ext, ev.gfid_samples, shape)
        save_grid(gen["images"], art.file("samples.png"))
        ref_f = reference_features(cfg, ext)
        summary[f"gfid_{tag}"] = metrics.fid_from_features(ref_f, gen["features"])
        summary.update({"gfid_samples": int(gen["features"].shape[0]), "gfid_ref_images": int(ref_f.shape[0]),
                        f"is_{tag}": metrics.inception_score(probs=gen["probs"])[0],
                        f"diversity_{tag}": _diversity(gen["features"], gen["labels"]),
                        "latent_diversity": _diversity(gen["latents"], gen["labels"]),
                        "extractor": tag, "extractor_weights": ext.weights_source,
                        "random_init": bool(ext.weights_source == "random-init" or tok_random(cfg))})
        art.mark_done(summary)
    ctx.barrier()
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
             n: int, shape: tuple[int, ...], seed_offset: int = 4242) -> dict[str, torch.Tensor]:
    """`n` class-conditional samples (class-balanced labels) with the configured sampler, decoded; returns
    their features, class probabilities, labels, flattened latents and the first grid of images."""
    ev, dev = cfg.eval, ctx.device
    sampler = Sampler(kind=ev.sampler, steps=ev.sampler_steps, cfg_scale=ev.cfg_scale)
    g = torch.Generator().manual_seed(cfg.run.seed + seed_offset)
    labels = balanced_labels(n, cfg.data.num_classes)
    out: dict[str, list] = {"features": [], "probs": [], "labels": [], "latents": []}
    grid = None
    from tqdm.auto import tqdm
    for start in tqdm(range(0, n, ev.batch_size), desc=f"{ctx.stage}: {n} samples", leave=False,
                      disable=os.environ.get("DMVAE_NO_PROGRESS") == "1" or not ctx.is_main or ctx.opts.ray):
        y = labels[start:start + ev.batch_size]
        noise = torch.randn((len(y), *shape), generator=g)
        with ctx.autocast():
            z = sampler(net, noise.to(dev), y.to(dev), generator=g).float()
            img = tok.decode(tok.denormalize(z)).float().clamp(-1, 1)
        feats, probs = ext.features_and_probs(img)
        out["features"].append(feats.cpu())
        out["probs"].append(probs.cpu())
        out["labels"].append(y)
        out["latents"].append(z.flatten(1).cpu())
        grid = img[: ev.grid_images].cpu() if grid is None else grid
    return {**{k: torch.cat(v) for k, v in out.items()}, "images": grid}


def reference_features(cfg: ExperimentConfig, ext: Features) -> torch.Tensor:
    """gFID's reference side: features of every training image, or of a class-balanced random subset of
    `eval.gfid_ref_images` (never the first N of a class-sorted folder), cached once per dataset and
    extractor in the study's store: every row of a study shares them."""
    n = cfg.eval.gfid_ref_images
    art = store_of(cfg).artifact("fid_ref", {"data": cfg.data.to_dict(), "extractor": ext.name, "n": n,
                                             "seed": cfg.run.seed, "rule": "balanced"})
    if art.done:
        return load_torch(art.file("features.pt"))
    train = build_dataset(cfg.data, "train", hflip=False)
    idx = list(range(len(train))) if n is None or n >= len(train) else \
        balanced_subset(dataset_targets(train), n, seed=cfg.run.seed)
    feats = torch.cat([ext.features(img).cpu() for img, _ in _batches(train, idx, cfg.eval.batch_size)])
    save_torch(art.file("features.pt"), feats)
    art.mark_done({"count": int(feats.shape[0]), "extractor": ext.name, "indices_head": idx[:8]})
    return feats


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
