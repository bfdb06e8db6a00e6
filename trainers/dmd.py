"""Stage 4 (Sec. 3.1, App. A.3): DMD joint training of the VAE and the fake score model.

The VAE (encoder included, the pretrained tokenizer's weights) and a projection head onto the
reference shape (when shapes differ) train on reconstruction + GAN + the DM loss (Eq. 9) once every
`vae_every` steps; the fake score model, initialised from the teacher, fits the current latents by
flow matching (Eq. 8) every step. The teacher is loaded from its artifact and verified by its
fingerprint: the official launch script silently leaves both score nets random; this stage refuses
to start without a finished teacher. Gradient routing (Sec. 3.1): the decoder sees only the
reconstruction loss, the head only the DM loss, the encoder both, the fake net only its own loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dmvae_study.build import build_dit, latent_shape, load_tokenizer, state_fingerprint
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.metrics import sliced_wasserstein
from dmvae_study.models.heads import build_head
from dmvae_study.objectives.dm import DistributionMatchingLoss, fake_score_loss
from dmvae_study.objectives.flow import annealed_t_max, sample_t
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import load_torch, save_torch
from trainers import artifacts
from trainers.common import (EMA, StageContext, adamw, apply_update, as_experiment, image_batches, progress,
                             resume, save)
from trainers.tokenizer import build_discriminator, build_recon_loss, finish_tokenizer


class TeacherMissingError(FileNotFoundError):
    """DMD needs the finished teacher (real score model) of the same prior."""


class DMVAE(nn.Module):
    """The VAE side of DMD as one module: `img -> (rec, z, x_ref)` with `x_ref = head(normalize(z))`
    the latent seen in the reference space (the DM loss acts on it)."""

    def __init__(self, tok: nn.Module, head: nn.Module):
        super().__init__()
        self.tok, self.head = tok, head

    def to_reference(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok.normalize(z))

    def forward(self, img: torch.Tensor):
        z = self.tok.encode(img)
        return self.tok.decode(z), z, self.to_reference(z)


def load_teacher(cfg: ExperimentConfig, ref: ReferenceSet, device: torch.device) -> nn.Module:
    art = artifacts.teacher(cfg)
    path = art.file("teacher.pt")
    if not (art.done and path.exists()):
        raise TeacherMissingError(f"DMD for prior {cfg.prior.name!r} needs its teacher at {path}; run the teacher "
                                  f"stage first (trainers.teacher / the study pipeline)")
    state = load_torch(path)
    want = art.summary().get("fingerprint")
    if want is not None and state_fingerprint(state) != want:
        raise RuntimeError(f"teacher weights at {path} do not match the fingerprint recorded when it finished")
    net = build_dit(cfg.teacher, ref.sample_shape, ref.num_classes)
    net.load_state_dict(state)
    return net.to(device)


def dm_labels(cfg: ExperimentConfig, ref: ReferenceSet) -> bool:
    """Condition the score nets on image labels only when the reference labels are image classes
    (data-derived priors); synthetic priors' labels (GMM components) are not, so they use null."""
    from priors import get
    return ref.y is not None and get(cfg.prior.name).kind == "data" and ref.num_classes == cfg.data.num_classes


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    art = artifacts.dmd(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "dmd", extras)
    if ctx.is_main:
        art.write_config(artifacts.dmd_key(cfg))
    d, run = cfg.dmd, cfg.run
    ref = ReferenceSet.load(artifacts.reference(cfg))
    real = load_teacher(cfg, ref, ctx.device).eval().requires_grad_(False)
    fake = copy.deepcopy(real).train().requires_grad_(True)  # student initialised from the teacher (Sec. 3.2)
    tok_art = artifacts.tokenizer(cfg, "ae")
    tok = load_tokenizer(tok_art, ctx.device, trainable=True)
    tok.encoder.set_backbone_frozen(False)  # the whole VAE trains in DMD, encoder included
    head = build_head(latent_shape(cfg), ref.sample_shape, d.head, hidden=d.head_hidden)
    vae = DMVAE(tok, head)
    disc = build_discriminator(cfg)
    disc.load_state_dict(load_torch(tok_art.file("disc.pt")))
    rloss = build_recon_loss(cfg, 0 if d.gan else 10**12, ctx.device)
    dm = DistributionMatchingLoss(dm_weight=artifacts.dm_weight(cfg), cfg_scale=d.cfg_scale)
    use_y = dm_labels(cfg, ref)
    opt_vae = adamw(vae.parameters(), d.lr, ctx.device, betas=(0.9, 0.95))
    opt_fake = adamw(fake.parameters(), d.fake_lr, ctx.device, betas=(0.9, 0.95))
    opt_d = adamw(disc.parameters(), d.lr, ctx.device, betas=(0.9, 0.95))
    ctx.channels_last(tok.decoder, disc)
    vae_w, fake_w, disc_w = ctx.wrap(vae), ctx.wrap(fake), ctx.wrap(disc)
    ema = EMA(tok, cfg.tokenizer.ema_decay, cfg.run.ema_warmup)
    ema.shadow.to(ctx.device)
    state = {"vae": vae, "fake": fake, "disc": disc, "ema": ema, "opt_vae": opt_vae, "opt_fake": opt_fake,
             "opt_d": opt_d}
    start = resume(ctx, art, state)
    ds = build_dataset(cfg.data, "train")
    gb = d.batch_size
    batches = image_batches(ctx, ds, gb, start, d.total_steps)
    shape = ref.sample_shape
    last: dict = {}
    for step in progress(ctx, start, d.total_steps):
        ctx.maybe_inject_fault(step, art)
        img, y_img = next(batches)
        y = y_img if use_y else None
        g = ctx.generator(step)
        t_max = annealed_t_max(step / max(d.total_steps - 1, 1), d.t_max, d.t_max_end) \
            if d.timestep_schedule == "anneal" else d.t_max
        t = ctx.slice(sample_t(gb, t_min=d.t_min, t_max=t_max, generator=g))
        eps = ctx.slice(torch.randn((gb, *shape), generator=g))
        if step % d.vae_every == 0:  # VAE turn (App. A.3: once every k steps)
            vae.train()
            with ctx.autocast():
                rec, z, x = vae_w(img)
                loss_rec, stats = rloss.generator_loss(img, rec, step, disc, last_layer=tok.last_layer,
                                                       generator=g if ctx.device.type == "cpu" else None)
                loss_dm, dm_stats = dm(x, real, fake, y, t=t, eps=eps)
                loss = loss_rec + loss_dm
            if ctx.finite_or_skip(loss):
                opt_vae.zero_grad(set_to_none=True)
                loss.backward()
                opt_vae.step()
                ema.update(tok)
                ctx.log(step, {**stats, **{k: v for k, v in dm_stats.items()}, "loss/dm": loss_dm.detach(),
                               "dm/t_max": t_max})
            if d.gan:
                with ctx.autocast():
                    d_loss, d_stats = rloss.discriminator_loss(disc_w, img, rec.detach())
                apply_update(ctx, step, d_loss, opt_d, d_stats)
            x_fake = x.detach()
        else:
            with torch.no_grad(), ctx.autocast():
                x_fake = vae.to_reference(tok.encode(img)).float()
        # Fake score model turn, every step (Eq. 8): flow matching on the current latents, detached.
        with ctx.autocast():
            drop = ctx.slice(torch.rand(gb, generator=g) < cfg.teacher.class_dropout)
            loss_f = fake_score_loss(lambda xt, tt, yy: fake_w(xt, tt, yy, force_drop=drop), x_fake.float(),
                                     y, t=ctx.slice(sample_t(gb, generator=g)),
                                     eps=ctx.slice(torch.randn((gb, *shape), generator=g)))
        if ctx.finite_or_skip(loss_f):
            opt_fake.zero_grad(set_to_none=True)
            loss_f.backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
            opt_fake.step()
            ctx.log(step, {"loss/fake": loss_f.detach()})
        if (step + 1) % run.log_every == 0 or step + 1 == d.total_steps:
            # Matching progress: sliced Wasserstein between this batch's latents and reference samples.
            ridx = torch.randint(0, len(ref), (x_fake.shape[0],), generator=g)
            swd = sliced_wasserstein(x_fake.float().cpu(), ref.x[ridx], seed=step)
            last = ctx.flush(step + 1, art, gb, extra={"match/swd": swd})
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == d.total_steps:
            save(ctx, art, step + 1, state)
    if ctx.is_main:
        save_torch(art.file("head.pt"), head.state_dict())
        save_torch(art.file("fake.pt"), fake.state_dict())
    extra = {"match/swd": last.get("match/swd"), "loss/dm": last.get("loss/dm"), "loss/rec": last.get("loss/rec"),
             "dm_weight": dm.dm_weight, "use_labels": use_y}
    return finish_tokenizer(ctx, art, cfg, "ae", ema.shadow, disc, ds, extra)
