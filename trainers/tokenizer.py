"""Stage 1 (App. A.1): tokenizer pretraining. A frozen backbone (or a conv encoder, trained), the MLP
projector and the Flux-style decoder, trained with L1 + LPIPS + PatchGAN hinge (adaptive weight 0.5
from `disc_start`, DiffAugment, bCR), with EMA. The beta-VAE baseline (KL term) and the VA-VAE baseline
(alignment to frozen foundation features) train through the same step, on the `baseline` section.
At the end the EMA tokenizer measures its latent mean / scale on the training set and is saved with
them as `tokenizer.pt`; the discriminator goes to `disc.pt` for the DMD stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dmvae_study.build import build_tokenizer, state_fingerprint
from dmvae_study.config import ExperimentConfig, latent_shape
from dmvae_study.data import build_dataset
from dmvae_study.models.autoencoder import AlignmentProjection, TokenizerWithAlignment
from dmvae_study.models.discriminator import NLayerDiscriminator
from dmvae_study.objectives.recon import ReconstructionLoss, build_lpips, kl_loss
from dmvae_study.objectives.vavae import VAVAEAlignmentLoss
from dmvae_study.pipeline import LaunchOptions, tokenizer_kind
from dmvae_study.store import ArtifactDir, save_torch
from trainers.common import (EMA, Optim, StageContext, apply_update, loop_tail, progress, resume, run_stage,
                             unwrap)
from trainers.frozen import WithFeatures, cached_features


def build_recon_loss(cfg: ExperimentConfig, disc_start: int | None, device: torch.device) -> ReconstructionLoss:
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
    kw = {"layer": cfg.tokenizer.vavae_layer} if cfg.tokenizer.vavae_layer else {}
    bb, encode = build_grid_backbone(cfg.tokenizer.vavae_backbone, (h, w), vit_patch=cfg.tokenizer.backbone_patch,
                                     weights_dir=cfg.run.weights_dir, seed=cfg.run.seed, device=device,
                                     allow_random_weights=cfg.run.allow_random_weights, **kw)
    return bb, torch.no_grad()(lambda img: encode(img).float())


def _inference_copy(bb: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`img -> features` of a frozen copy of a backbone, BatchNorms folded where it has them."""
    import copy
    net = copy.deepcopy(bb).eval()
    if hasattr(net, "fuse_bn_"):
        net.fuse_bn_()
    return torch.no_grad()(lambda img: net.to(img.device)(img))


@dataclass
class TokenizerState:
    """Everything one pretraining step touches."""

    ctx: StageContext
    kind: str
    tok: nn.Module
    model: TokenizerWithAlignment
    model_w: nn.Module
    disc: nn.Module
    disc_w: nn.Module
    rloss: ReconstructionLoss
    opt_g: Optim
    opt_d: Optim
    ema: EMA
    vf: VAVAEAlignmentLoss | None = None
    feats: Callable[[torch.Tensor], torch.Tensor] | None = None
    frozen: tuple[str, Callable[[torch.Tensor], torch.Tensor], dict] | None = None  # what the feature cache holds

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model, "disc": self.disc, "ema": self.ema, "opt_g": self.opt_g, "opt_d": self.opt_d}


def setup(ctx: StageContext, rloss: ReconstructionLoss | None = None,
          device: str = "cpu") -> tuple[TokenizerState, dict[str, str]]:
    """Build the row's tokenizer (kind from the row), its discriminator, losses and optimisers. `rloss`
    replaces the config's reconstruction loss (benchmarks: a random-trunk LPIPS); `device="meta"` builds
    shapes only (FLOP counting)."""
    cfg, t = ctx.cfg, ctx.cfg.tokenizer
    kind = tokenizer_kind(cfg)
    tok = build_tokenizer(cfg, kind, device=device)
    align, feats, vf, sources, frozen = None, None, None, {}, None
    bb = tok.encoder.backbone
    if hasattr(bb, "weights_source"):
        sources["backbone_weights"] = bb.weights_source
        if tok.encoder.backbone_frozen:  # a frozen pretrained encoder: its features can be computed once
            key = {"layer": t.backbone_layer, "patch": t.backbone_patch, "grid": list(latent_shape(cfg)[1:]),
                   "weights": bb.weights_source, "seed": cfg.run.seed if bb.weights_source == "random-init" else None}
            frozen = (t.backbone, _inference_copy(bb), key)
    if kind == "vavae":
        abb, feats = alignment_features(cfg, ctx.device)
        sources["vavae_weights"] = abb.weights_source
        align = AlignmentProjection(t.latent_channels, abb.out_channels)
        vf = VAVAEAlignmentLoss(vf_weight=t.vavae_weight, cos_margin=t.vavae_cos_margin,
                                distmat_margin=t.vavae_distmat_margin)
        frozen = (t.vavae_backbone, feats, {"layer": t.vavae_layer, "patch": t.backbone_patch,
                                            "grid": list(latent_shape(cfg)[1:]), "weights": abb.weights_source,
                                            "seed": cfg.run.seed if abb.weights_source == "random-init" else None})
    model = TokenizerWithAlignment(tok, align)
    disc = build_discriminator(cfg)
    rloss = rloss or build_recon_loss(cfg, t.disc_start, ctx.device)
    opt_g, opt_d = Optim(model.parameters(), t, ctx.device), Optim(disc.parameters(), t, ctx.device)
    ctx.channels_last(tok.decoder, disc)
    model_w, disc_w = ctx.wrap(model), ctx.wrap(disc)
    ema = EMA(tok, t.ema_decay, cfg.run.ema_warmup)
    ema.shadow.to(ctx.device)
    return TokenizerState(ctx, kind, tok, model, model_w, disc, disc_w, rloss, opt_g, opt_d, ema, vf, feats,
                          frozen), sources


def step(s: TokenizerState, step: int, img: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
    """One pretraining step on this rank's images `(b, 3, H, W)`: the tokenizer update (reconstruction +
    GAN from `disc_start`, + KL for the beta-VAE, + VF alignment for VA-VAE), EMA, then the discriminator.
    `frozen`: the cached frozen features of these images (the encoder's backbone, or VA-VAE's alignment
    backbone), as `s.frozen` says; None computes them."""
    ctx, t = s.ctx, s.ctx.cfg.tokenizer
    g = ctx.generator(step, salt=ctx.rank) if ctx.device.type == "cpu" else None
    enc_feats = frozen if frozen is not None and s.kind != "vavae" else None
    with ctx.autocast():
        rec, z, aux = s.model_w(img, features=enc_feats) if enc_feats is not None else s.model_w(img)
        loss, stats = s.rloss.generator_loss(img, rec, step, s.disc, last_layer=s.tok.last_layer, generator=g)
        if s.kind == "beta_vae":
            kl = kl_loss(aux["mean"], aux["logvar"])
            loss = loss + t.kl_weight * kl
            stats["loss/kl"] = kl.detach()
        if s.vf is not None:
            target = frozen if frozen is not None else s.feats(img)
            l_vf, st = s.vf(z, target, unwrap(s.model_w).align, rec_loss=loss,
                            last_layer=s.tok.encoder.last_layer)
            loss = loss + l_vf
            stats.update(st)
    if apply_update(ctx, step, loss, s.opt_g, stats):
        s.ema.update(s.tok)
    if s.rloss.gan_active(step):
        s.disc.train()
        with ctx.autocast():
            d_loss, d_stats = s.rloss.discriminator_loss(s.disc_w, img, rec.detach(), generator=g)
        apply_update(ctx, step, d_loss, s.opt_d, d_stats)


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg, t = ctx.cfg, ctx.cfg.tokenizer
    ds = build_dataset(cfg.data, "train")
    s, sources = setup(ctx)
    state = s.checkpoint()
    start = resume(ctx, art, state)
    train = ds
    if s.frozen is not None and start < t.total_steps:
        name, encode, key = s.frozen
        train = WithFeatures(ds, *cached_features(ctx, name, encode, key))
    batches = ctx.image_batches(train, t.batch_size, start, t.total_steps)
    for i in progress(ctx, start, t.total_steps):
        ctx.maybe_inject_fault(i, art)
        img, _, *frozen = next(batches)
        step(s, i, img, frozen[0] if frozen else None)
        loop_tail(ctx, art, i, t.total_steps, t.batch_size, state)
    return finish_tokenizer(ctx, art, s.kind, s.ema.shadow, s.disc, ds, sources)


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Pretrain the row's tokenizer (reused when its artifact is finished)."""
    return run_stage("tokenizer", cfg, opts)


@torch.no_grad()
def finish_tokenizer(ctx: StageContext, art: ArtifactDir, kind: str, tok: nn.Module, disc: nn.Module, ds,
                     extra: dict | None = None) -> dict[str, Any]:
    """Measure latent mean / scale on (up to 4096) un-flipped training images, save `tokenizer.pt` and
    `disc.pt`. `ds` is the stage's training set (its count of skipped unreadable images is recorded)."""
    summary: dict[str, Any] = dict(extra or {})
    if ctx.is_main:
        tok.eval()
        plain = build_dataset(ctx.cfg.data, "train", hflip=False)
        n = min(len(plain), 4096)
        bs = 128

        def latents():
            for s in range(0, n, bs):
                img = torch.stack([plain[i][0] for i in range(s, min(s + bs, n))]).to(ctx.device)
                with ctx.autocast():
                    yield tok.encode(img).float()
        mean, scale = tok.measure_latent_stats(latents())
        state = {k: v.cpu() for k, v in tok.state_dict().items()}
        save_torch(art.file("tokenizer.pt"), {"config": ctx.cfg.to_dict(), "kind": kind, "state": state})
        save_torch(art.file("disc.pt"), unwrap(disc).state_dict())
        # the fingerprint tells apart two trainings under one key (a store lost and retrained on another machine)
        summary.update({"latent_mean": mean, "latent_scale": scale, "kind": kind, "fingerprint": state_fingerprint(state)})
        bad: set[str] | None = None
        for d in (ds, plain):  # unreadable images skipped (and warned about) by training and the stats pass
            while isinstance(d, torch.utils.data.Subset):
                d = d.dataset
            if hasattr(d, "bad_files"):
                bad = (bad or set()) | set(d.bad_files)
        if bad is not None:
            summary["skipped_images"] = len(bad)
        art.mark_done(summary)
    ctx.barrier()
    return art.summary()
