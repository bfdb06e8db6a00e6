"""Stage 5 (Sec. 3.1 Step 3, App. A.4): decoder refinement. The DMD tokenizer's encoder and projector
are frozen; the decoder is fine-tuned on the reconstruction objective (Eq. 10) alone, so it adapts
to the final latent manifold. The latent statistics stay those measured after DMD (the encoder
does not change)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmvae_study.build import load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.objectives.recon import ReconstructionLoss
from dmvae_study.pipeline import LaunchOptions, artifact
from dmvae_study.store import ArtifactDir, load_torch
from trainers.common import EMA, Optim, StageContext, apply_update, loop_tail, progress, resume, run_stage
from trainers.tokenizer import build_discriminator, build_recon_loss, finish_tokenizer


@dataclass
class RefineState:
    ctx: StageContext
    tok: nn.Module
    dec_w: nn.Module
    disc: nn.Module
    disc_w: nn.Module
    rloss: ReconstructionLoss
    opt_g: Optim
    opt_d: Optim
    ema: EMA

    def checkpoint(self) -> dict[str, Any]:
        return {"tok": self.tok, "disc": self.disc, "ema": self.ema, "opt_g": self.opt_g, "opt_d": self.opt_d}


def setup(ctx: StageContext) -> RefineState:
    """The state over the DMD stage's tokenizer and discriminator."""
    src = artifact(ctx.cfg, "dmd")
    tok = load_tokenizer(src, ctx.device, trainable=True)
    disc = build_discriminator(ctx.cfg)
    disc.load_state_dict(load_torch(src.file("disc.pt")))
    return state_for(ctx, tok, disc)


def state_for(ctx: StageContext, tok: nn.Module, disc: nn.Module) -> RefineState:
    """Refinement of `tok`'s decoder against `disc` (benchmarks pass modules not loaded from an artifact)."""
    cfg, r = ctx.cfg, ctx.cfg.refine
    tok.encoder.requires_grad_(False).eval()  # encoder and projector frozen (App. A.4)
    rloss = build_recon_loss(cfg, 0, ctx.device)
    opt_g, opt_d = Optim(tok.decoder.parameters(), r, ctx.device), Optim(disc.parameters(), r, ctx.device)
    ctx.channels_last(tok.decoder, disc)
    dec_w, disc_w = ctx.wrap(tok.decoder), ctx.wrap(disc)
    ema = EMA(tok, cfg.tokenizer.ema_decay, cfg.run.ema_warmup)
    ema.shadow.to(ctx.device)
    return RefineState(ctx, tok, dec_w, disc, disc_w, rloss, opt_g, opt_d, ema)


def step(s: RefineState, step: int, img: torch.Tensor) -> None:
    """One decoder step on frozen latents (reconstruction + GAN), EMA, then the discriminator."""
    ctx = s.ctx
    with torch.no_grad():
        z = s.tok.encode(img)
    s.tok.decoder.train()
    with ctx.autocast():
        rec = s.dec_w(z)
        loss, stats = s.rloss.generator_loss(img, rec, step, s.disc, last_layer=s.tok.last_layer)
    if apply_update(ctx, step, loss, s.opt_g, stats):
        s.ema.update(s.tok)
    with ctx.autocast():
        d_loss, d_stats = s.rloss.discriminator_loss(s.disc_w, img, rec.detach())
    apply_update(ctx, step, d_loss, s.opt_d, d_stats)


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg, r = ctx.cfg, ctx.cfg.refine
    s = setup(ctx)
    state = s.checkpoint()
    start = resume(ctx, art, state)
    ds = build_dataset(cfg.data, "train")
    batches = ctx.image_batches(ds, r.batch_size, start, r.total_steps)
    for i in progress(ctx, start, r.total_steps):
        ctx.maybe_inject_fault(i, art)
        img, _ = next(batches)
        step(s, i, img)
        loop_tail(ctx, art, i, r.total_steps, r.batch_size, state)
    if r.total_steps == 0:  # refinement off: hand on the DMD tokenizer unchanged
        s.tok.eval()
    return finish_tokenizer(ctx, art, "ae", s.ema.shadow if r.total_steps else s.tok, s.disc, ds,
                            {"steps": r.total_steps})


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Refine this row's decoder (reused when its artifact is finished)."""
    return run_stage("refine", cfg, opts)
