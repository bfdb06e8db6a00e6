"""Stage 1 (App. A.1): tokenizer pretraining. A frozen backbone (or the small conv encoder, trained),
the MLP projector and the Flux-style decoder, trained with L1 + LPIPS + PatchGAN hinge (adaptive
weight 0.5 from `disc_start`, DiffAugment, bCR), with EMA. The beta-VAE baseline (KL term) and the
VA-VAE baseline (alignment to frozen foundation features) train through the same loop.
At the end the EMA tokenizer measures its latent mean / scale on the training set and is saved with
them as `tokenizer.pt`; the discriminator goes to `disc.pt` for the DMD stage."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmvae_study.build import build_tokenizer, latent_shape
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.models.discriminator import NLayerDiscriminator
from dmvae_study.objectives.recon import ReconstructionLoss, build_lpips
from dmvae_study.store import save_torch
from trainers import artifacts
from trainers.common import (EMA, StageContext, adamw, apply_update, as_experiment, image_batches, progress,
                             resume, save,
                             unwrap)


class TokenizerWithAlignment(nn.Module):
    """The trainable unit of the stage (one DDP module): tokenizer, plus VA-VAE's projection."""

    def __init__(self, tok: nn.Module, align: nn.Module | None):
        super().__init__()
        self.tok, self.align = tok, align

    def forward(self, img: torch.Tensor):
        rec, z, aux = self.tok(img)
        if self.align is not None:
            aux = {**aux, "z_proj": self.align(z)}
        return rec, z, aux


def build_recon_loss(cfg: ExperimentConfig, disc_start: int, device: torch.device) -> ReconstructionLoss:
    t = cfg.tokenizer
    lp = build_lpips(t.lpips_net, cfg.run.weights_dir).to(device) if t.lpips_weight > 0 else None
    return ReconstructionLoss(lpips_weight=t.lpips_weight, disc_weight=t.disc_weight, disc_start=disc_start,
                              diffaug="color,translation,cutout" if t.diffaug else "", lpips_module=lp)


def build_discriminator(cfg: ExperimentConfig) -> NLayerDiscriminator:
    t = cfg.tokenizer
    return NLayerDiscriminator(in_channels=3, ndf=max(16, t.decoder_ch // 2), n_layers=t.disc_layers)


def alignment_features(cfg: ExperimentConfig, device: torch.device):
    """VA-VAE's frozen foundation features on the latent grid: `img -> (B, D, h, w)`."""
    from dmvae_study.backbones import build_grid_backbone
    _, h, w = latent_shape(cfg)
    bb, encode = build_grid_backbone(cfg.tokenizer.vavae_backbone, (h, w), vit_patch=cfg.tokenizer.backbone_patch,
                                     weights_dir=cfg.run.weights_dir, seed=cfg.run.seed, device=device,
                                     allow_random_weights=cfg.run.allow_random_weights)
    return bb, torch.no_grad()(lambda img: encode(img).float())


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    kind = artifacts.row_kind(cfg)
    art = artifacts.tokenizer(cfg, kind)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "tokenizer", extras)
    if ctx.is_main:
        art.write_config(artifacts.tokenizer_key(cfg, kind))
    t, run = cfg.tokenizer, cfg.run
    ds = build_dataset(cfg.data, "train")
    tok = build_tokenizer(cfg, kind)
    align, feats_fn, vf, sources = None, None, None, {}
    if hasattr(tok.encoder.backbone, "weights_source"):
        sources["backbone_weights"] = tok.encoder.backbone.weights_source
    if kind == "vavae":
        from dmvae_study.objectives.vavae import AlignmentProjection, VAVAEAlignmentLoss
        bb, feats_fn = alignment_features(cfg, ctx.device)
        sources["vavae_weights"] = bb.weights_source
        align = AlignmentProjection(t.latent_channels, bb.out_channels)
        vf = VAVAEAlignmentLoss(vf_weight=t.vavae_weight)
    model = TokenizerWithAlignment(tok, align)
    disc = build_discriminator(cfg)
    rloss = build_recon_loss(cfg, t.disc_start, ctx.device)
    opt_g = adamw(model.parameters(), t.lr, ctx.device, betas=(0.9, 0.95))
    opt_d = adamw(disc.parameters(), t.lr, ctx.device, betas=(0.9, 0.95))
    ctx.channels_last(tok.decoder, disc)
    model_w, disc_w = ctx.wrap(model), ctx.wrap(disc)
    ema = EMA(tok, t.ema_decay, cfg.run.ema_warmup)
    ema.shadow.to(ctx.device)
    state = {"model": model, "disc": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d}
    start = resume(ctx, art, state)
    gb = t.batch_size
    batches = image_batches(ctx, ds, gb, start, t.total_steps)
    for step in progress(ctx, start, t.total_steps):
        ctx.maybe_inject_fault(step, art)
        img, _ = next(batches)
        g = ctx.generator(step, salt=ctx.rank) if ctx.device.type == "cpu" else None
        with ctx.autocast():
            rec, z, aux = model_w(img)
            loss, stats = rloss.generator_loss(img, rec, step, disc, last_layer=tok.last_layer, generator=g)
            if kind == "beta_vae":
                loss = loss + t.kl_weight * aux["kl"]
                stats["loss/kl"] = aux["kl"].detach()
            if vf is not None:
                l_vf, st = vf(z, feats_fn(img), unwrap(model_w).align, rec_loss=loss,
                              last_layer=tok.encoder.last_layer)
                loss = loss + l_vf
                stats.update(st)
        if ctx.finite_or_skip(loss):
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            ema.update(tok)
            ctx.log(step, stats)
        if rloss.gan_active(step):
            disc.train()
            with ctx.autocast():
                d_loss, d_stats = rloss.discriminator_loss(disc_w, img, rec.detach(), generator=g)
            apply_update(ctx, step, d_loss, opt_d, d_stats)
        if (step + 1) % run.log_every == 0 or step + 1 == t.total_steps:
            ctx.flush(step + 1, art, gb)
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == t.total_steps:
            save(ctx, art, step + 1, state)
    summary = finish_tokenizer(ctx, art, cfg, kind, ema.shadow, disc, ds, sources)
    return summary


@torch.no_grad()
def finish_tokenizer(ctx: StageContext, art, cfg: ExperimentConfig, kind: str, tok: nn.Module, disc: nn.Module,
                     ds, extra: dict | None = None) -> dict[str, Any]:
    """Measure latent mean / scale on (up to 4096) training images, save `tokenizer.pt` and `disc.pt`."""
    summary: dict[str, Any] = dict(extra or {})
    if ctx.is_main:
        tok.eval()
        n = min(len(ds), 4096)
        bs = 128

        def latents():
            for s in range(0, n, bs):
                img = torch.stack([ds[i][0] for i in range(s, min(s + bs, n))]).to(ctx.device)
                with ctx.autocast():
                    yield tok.encode(img).float()
        mean, scale = tok.measure_latent_stats(latents())
        save_torch(art.file("tokenizer.pt"), {"config": cfg.to_dict(), "kind": kind,
                                              "state": {k: v.cpu() for k, v in tok.state_dict().items()}})
        save_torch(art.file("disc.pt"), unwrap(disc).state_dict())
        summary.update({"latent_mean": mean, "latent_scale": scale, "kind": kind})
        base = ds
        while isinstance(base, torch.utils.data.Subset):
            base = base.dataset
        if hasattr(base, "skipped"):  # unreadable images skipped (and warned about) by this process
            summary["skipped_images"] = base.skipped
        art.mark_done(summary)
    ctx.barrier()
    return art.summary()
