"""Stage 5 (Sec. 3.1 Step 3, App. A.4): decoder refinement. The DMD tokenizer's encoder and projector
are frozen; the decoder is fine-tuned on the reconstruction objective (Eq. 10) alone, so it adapts
to the final latent manifold. The latent statistics stay those measured after DMD (the encoder
does not change)."""

from __future__ import annotations

from typing import Any

import torch

from dmvae_study.build import load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.store import load_torch
from trainers import artifacts
from trainers.common import (EMA, StageContext, adamw, apply_update, as_experiment, image_batches, progress,
                             resume, save)
from trainers.tokenizer import build_discriminator, build_recon_loss, finish_tokenizer


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    art = artifacts.refine(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "refine", extras)
    if ctx.is_main:
        art.write_config(artifacts.final_tokenizer_key(cfg))
    r, run = cfg.refine, cfg.run
    src = artifacts.dmd(cfg)
    tok = load_tokenizer(src, ctx.device, trainable=True)
    tok.encoder.requires_grad_(False).eval()  # encoder and projector frozen (App. A.4)
    disc = build_discriminator(cfg)
    disc.load_state_dict(load_torch(src.file("disc.pt")))
    rloss = build_recon_loss(cfg, 0, ctx.device)
    opt_g = adamw(tok.decoder.parameters(), r.lr, ctx.device, betas=(0.9, 0.95))
    opt_d = adamw(disc.parameters(), r.lr, ctx.device, betas=(0.9, 0.95))
    ctx.channels_last(tok.decoder, disc)
    dec_w, disc_w = ctx.wrap(tok.decoder), ctx.wrap(disc)
    ema = EMA(tok, cfg.tokenizer.ema_decay, cfg.run.ema_warmup)
    ema.shadow.to(ctx.device)
    state = {"tok": tok, "disc": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d}
    start = resume(ctx, art, state)
    ds = build_dataset(cfg.data, "train")
    batches = image_batches(ctx, ds, r.batch_size, start, r.total_steps)
    for step in progress(ctx, start, r.total_steps):
        ctx.maybe_inject_fault(step, art)
        img, _ = next(batches)
        with torch.no_grad():
            z = tok.encode(img)
        tok.decoder.train()
        with ctx.autocast():
            rec = dec_w(z)
            loss, stats = rloss.generator_loss(img, rec, step, disc, last_layer=tok.last_layer)
        if ctx.finite_or_skip(loss):
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            ema.update(tok)
            ctx.log(step, stats)
        with ctx.autocast():
            d_loss, d_stats = rloss.discriminator_loss(disc_w, img, rec.detach())
        apply_update(ctx, step, d_loss, opt_d, d_stats)
        if (step + 1) % run.log_every == 0 or step + 1 == r.total_steps:
            ctx.flush(step + 1, art, r.batch_size)
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == r.total_steps:
            save(ctx, art, step + 1, state)
    if r.total_steps == 0:  # refinement off: hand on the DMD tokenizer unchanged
        tok.eval()
    return finish_tokenizer(ctx, art, cfg, "ae", ema.shadow if r.total_steps else tok, disc, ds,
                            {"steps": r.total_steps})
