"""Stage 7: metrics of a row (paper Sec. 5): PSNR and rFID of validation reconstructions; gFID-N
and IS of stage-2 samples with the configured sampler (default: SDE, 250 steps, no CFG); sample
diversity within class as DP-DMD measures it, on features and on latents (exposes mode collapse);
reconstruction and sample grids as PNG. Every FID-type figure is named by its feature extractor
(`rfid_lite0`, `gfid_inception`, ...), and random-init weights are flagged in the summary."""

from __future__ import annotations

import os
from typing import Any

import torch

from dmvae_study import metrics
import torch.nn.functional as F

from dmvae_study.build import build_dit, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.samplers import Sampler
from dmvae_study.store import load_torch
from trainers import artifacts
from trainers.common import StageContext, as_experiment


def _batches(ds, n: int, bs: int):
    n = min(n, len(ds))
    for start in range(0, n, bs):
        items = [ds[i] for i in range(start, min(start + bs, n))]
        yield torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


class Features:
    """A metrics.FIDExtractor applied to [-1, 1] images: clean-fid's [0, 255] range and input size."""

    def __init__(self, name: str, cfg: ExperimentConfig, device: torch.device):
        self.ext = metrics.fid_extractor(name, device, cfg.run.weights_dir)
        self.name, self.weights_source, self.device = name, self.ext.weights_source, device

    def _prep(self, img: torch.Tensor) -> torch.Tensor:
        x = ((img.float().clamp(-1, 1) + 1) * 127.5).to(self.device)
        s = self.ext.size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        return x

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> torch.Tensor:
        return self.ext(self._prep(img)).float()

    @torch.no_grad()
    def probs(self, img: torch.Tensor) -> torch.Tensor:
        return self.ext.probs(self._prep(img)).float()

    @torch.no_grad()
    def features_and_probs(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, probs = self.ext.features_and_probs(self._prep(img))
        return feats.float(), probs.float()


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Images `(N, C, H, W)` in [-1, 1] to one PNG."""
    from torchvision.utils import save_image
    save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, str(path), nrow=nrow)


@torch.no_grad()
def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    art = artifacts.evaluation(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "eval", extras)
    summary: dict[str, Any] = {}
    if ctx.is_main:
        art.write_config(cfg.to_dict())
        ev, dev = cfg.eval, ctx.device
        tok = load_tokenizer(artifacts.final_tokenizer(cfg), dev)
        ext = Features(ev.extractor, cfg, dev)
        tag = ext.name

        # Reconstruction: PSNR and rFID on held-out images.
        val = build_dataset(cfg.data, "val")
        real_f, rec_f, psnrs = [], [], []
        for i, (img, _) in enumerate(_batches(val, ev.rfid_images, ev.batch_size)):
            img = img.to(dev)
            with ctx.autocast():
                rec = tok.decode(tok.encode(img)).float().clamp(-1, 1)
            psnrs.append(float(metrics.psnr(rec, img, data_range=2.0)) * img.shape[0])
            real_f.append(ext.features(img).cpu())
            rec_f.append(ext.features(rec).cpu())
            if i == 0:
                k = min(ev.grid_images, img.shape[0])
                save_grid(torch.cat([img[:k], rec[:k]]).cpu(), art.file("reconstructions.png"))
        n_val = sum(f.shape[0] for f in real_f)
        summary["psnr"] = float(sum(psnrs) / n_val)
        summary[f"rfid_{tag}"] = metrics.fid_from_features(torch.cat(real_f), torch.cat(rec_f))

        # Generation: samples of the stage-2 DiT, decoded, against training-set statistics.
        lat = load_torch(artifacts.latents(cfg).file("latents.pt"))
        shape = tuple(lat["z"].shape[1:])
        net = build_dit(cfg.generator, shape, cfg.data.num_classes).to(dev).eval()
        net.load_state_dict(load_torch(artifacts.generator(cfg).file("generator.pt")))
        gen = generate(cfg, ctx, net, tok, ext, ev.gfid_samples, shape)
        save_grid(gen["images"], art.file("samples.png"))
        ref_f = reference_features(cfg, ext)
        gen_f, gen_y = gen["features"], gen["labels"]
        summary[f"gfid_{tag}"] = metrics.fid_from_features(ref_f, gen_f)
        summary["gfid_samples"] = int(gen_f.shape[0])
        summary[f"is_{tag}"] = metrics.inception_score(probs=gen["probs"])[0]
        summary[f"diversity_{tag}"] = metrics.diversity(gen_f, gen_y)
        summary["latent_diversity"] = metrics.diversity(gen["latents"], gen_y)
        summary["extractor"] = tag
        summary["extractor_weights"] = ext.weights_source
        summary["random_init"] = bool(ext.weights_source == "random-init" or tok_random(cfg))
        art.mark_done(summary)
    ctx.barrier()
    return art.summary()


@torch.no_grad()
def generate(cfg: ExperimentConfig, ctx: StageContext, net: torch.nn.Module, tok: torch.nn.Module, ext: Features,
             n: int, shape: tuple[int, ...], seed_offset: int = 4242) -> dict[str, torch.Tensor]:
    """`n` class-conditional samples (uniform labels) with the configured sampler, decoded; returns
    their features, class probabilities, labels, flattened latents and the first grid of images."""
    ev, dev = cfg.eval, ctx.device
    sampler = Sampler(kind=ev.sampler, steps=ev.sampler_steps, cfg_scale=ev.cfg_scale)
    g = torch.Generator().manual_seed(cfg.run.seed + seed_offset)
    out: dict[str, list] = {"features": [], "probs": [], "labels": [], "latents": []}
    grid = None
    from tqdm.auto import tqdm
    for start in tqdm(range(0, n, ev.batch_size), desc=f"{ctx.stage}: {n} samples", leave=False,
                      disable=os.environ.get("DMVAE_NO_PROGRESS") == "1" or not ctx.is_main):
        b = min(ev.batch_size, n - start)
        y = torch.randint(0, cfg.data.num_classes, (b,), generator=g)
        noise = torch.randn((b, *shape), generator=g)
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
    """Features of `gfid_samples` training images (gFID's reference side), cached once per dataset
    and extractor: every row of a study shares them."""
    from dmvae_study.store import save_torch
    from trainers.common import store_of
    n = cfg.eval.gfid_samples
    art = store_of(cfg).artifact("fid_ref", {"data": cfg.data.to_dict(), "extractor": ext.name, "n": n})
    if art.done:
        return load_torch(art.file("features.pt"))
    train = build_dataset(cfg.data, "train", hflip=False)
    feats = torch.cat([ext.features(img).cpu() for img, _ in _batches(train, n, cfg.eval.batch_size)])
    save_torch(art.file("features.pt"), feats)
    art.mark_done({"count": int(feats.shape[0]), "extractor": ext.name})
    return feats


def tok_random(cfg: ExperimentConfig) -> bool:
    """Whether any network behind this row ran on random-init weights (flagged in every table):
    the tokenizer's backbone or VA-VAE features, or the prior's feature backbone."""
    sources = [str(v) for k, v in artifacts.tokenizer(cfg).summary().items() if k.endswith("_weights")]
    meta = artifacts.reference(cfg).file("meta.json")
    if cfg.prior.name not in artifacts.BASELINE_ROWS and meta.exists():
        import json
        sources.append(str(json.loads(meta.read_text()).get("provenance", {}).get("weights_source", "")))
    return any("random-init" in s for s in sources)
