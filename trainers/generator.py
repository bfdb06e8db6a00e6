"""Stage 6 (App. A.5): a fresh LightningDiT on the final tokenizer's latents.

Latents are encoded once into a cache artifact (with horizontally flipped variants) and
normalised by the latent mean / scale the tokenizer measured on the training set, so the DiT
loop never re-runs the encoder (the official loop re-encodes every image on every step)."""

from __future__ import annotations

from typing import Any

import torch

from dmvae_study.build import load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.store import load_torch, save_torch
from trainers import artifacts
from trainers.common import StageContext, as_experiment
from trainers.flowfit import fit_flow_model


@torch.no_grad()
def cache_latents(cfg: ExperimentConfig, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents `(N, C, h, w)` (+ flips) and labels `(N,)` of the training set, cached."""
    art = artifacts.latents(cfg)
    if art.done:
        d = load_torch(art.file("latents.pt"))
        return d["z"].float(), d["y"]
    if ctx.is_main:
        tok = load_tokenizer(artifacts.final_tokenizer(cfg), ctx.device)
        ds = build_dataset(cfg.data, "train", hflip=False)
        zs, ys = [], []
        bs = cfg.eval.batch_size
        for start in range(0, len(ds), bs):
            items = [ds[i] for i in range(start, min(start + bs, len(ds)))]
            img = torch.stack([a for a, _ in items]).to(ctx.device)
            y = torch.tensor([b for _, b in items])
            views = [img, img.flip(-1)] if cfg.generator.flip_cache else [img]
            for v in views:
                with ctx.autocast():
                    zs.append(tok.normalize(tok.encode(v)).float().cpu())
                ys.append(y)
        z, y = torch.cat(zs), torch.cat(ys)
        save_torch(art.file("latents.pt"), {"z": z.to(torch.float16 if z.abs().max() < 6e4 else torch.float32), "y": y})
        art.mark_done({"count": int(z.shape[0]), "shape": list(z.shape[1:])})
    ctx.barrier()
    d = load_torch(art.file("latents.pt"))
    return d["z"].float(), d["y"]


def gfid_curve(cfg: ExperimentConfig, ctx: StageContext, shape: tuple[int, ...]):
    """Callback for Fig. 8: every `generator.eval_every` steps, gFID of the current EMA net on
    min(gfid_samples, 1000) samples (logged as `eval/gfid_curve`; main rank only)."""
    every = cfg.generator.eval_every
    if every <= 0:
        return None
    from trainers import evaluate
    state: dict = {}

    def on_log(step: int, metrics: dict, ema: torch.nn.Module) -> dict:
        if step % every or not ctx.is_main:
            return {}
        if not state:
            state["tok"] = load_tokenizer(artifacts.final_tokenizer(cfg), ctx.device)
            state["ext"] = evaluate.Features(cfg.eval.extractor, cfg, ctx.device)
            state["ref"] = evaluate.reference_features(cfg, state["ext"])
        n = min(cfg.eval.gfid_samples, 1000)
        gen = evaluate.generate(cfg, ctx, ema.eval(), state["tok"], state["ext"], n, shape, seed_offset=step)
        from dmvae_study.metrics import fid_from_features
        return {"eval/gfid_curve": fid_from_features(state["ref"], gen["features"]), "eval/gfid_curve_n": n}
    return on_log


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    art = artifacts.generator(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "generator", extras)
    if ctx.is_main:
        art.write_config(cfg.to_dict())
    z, y = cache_latents(cfg, ctx)
    ema, last = fit_flow_model(ctx, art, z, y, cfg.data.num_classes, cfg.generator,
                               on_log=gfid_curve(cfg, ctx, tuple(z.shape[1:])))
    summary = {"loss/fm": last.get("loss/fm"), "latent_shape": list(z.shape[1:]), "cached_latents": int(z.shape[0])}
    if ctx.is_main:
        save_torch(art.file("generator.pt"), ema.state_dict())
        art.mark_done(summary)
    ctx.barrier()
    return summary
