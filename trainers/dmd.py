"""Stage 4 (Sec. 3.1, App. A.3): DMD joint training of the VAE and the fake score model.

The VAE (encoder included, the pretrained tokenizer's weights) and a projection head onto the
reference shape (when shapes differ) train on reconstruction + GAN + the DM loss (Eq. 9) once every
`vae_every` steps; the fake score model, initialised from the teacher, fits the current latents by
flow matching (Eq. 8) every step. The teacher is loaded from its artifact and verified by its
fingerprint: the official launch script silently leaves both score nets random; this stage refuses
to start without a finished teacher. Gradient routing (Sec. 3.1): the decoder sees only the
reconstruction loss, the head only the DM loss, the encoder both, the fake net only its own loss.
Optimisation follows the official `train_dmd.py` (AdamW (0.9, 0.95), per-optimiser weight decay,
clipping and linear warmup, GAN from `gan_start`; all `dmd.*` fields).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmvae_study.build import build_dit, load_tokenizer, state_fingerprint
from dmvae_study.config import ExperimentConfig, latent_shape
from dmvae_study.data import build_dataset
from dmvae_study.metrics import sliced_wasserstein
from dmvae_study.models.autoencoder import DMVAE
from dmvae_study.models.heads import build_head
from dmvae_study.objectives.dm import DistributionMatchingLoss, fake_score_loss
from dmvae_study.objectives.flow import annealed_t_range, sample_t
from dmvae_study.objectives.recon import ReconstructionLoss
from dmvae_study.pipeline import LaunchOptions, artifact
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import ArtifactDir, load_torch, save_torch
from trainers.common import EMA, Optim, StageContext, apply_update, last_flushed, loop_tail, progress, resume, run_stage
from trainers.tokenizer import build_discriminator, build_recon_loss, finish_tokenizer


class TeacherMissingError(FileNotFoundError):
    """DMD needs the finished teacher (real score model) of the same prior."""


def load_teacher(cfg: ExperimentConfig, ref: ReferenceSet, device: torch.device) -> nn.Module:
    art = artifact(cfg, "teacher")
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


@dataclass
class DMDState:
    """Everything one DMD step touches (`make_state` builds it from modules; `setup` from artifacts)."""

    ctx: StageContext
    tok: nn.Module
    vae: DMVAE
    vae_w: nn.Module
    real: nn.Module
    fake: nn.Module
    fake_w: nn.Module
    disc: nn.Module
    disc_w: nn.Module
    rloss: ReconstructionLoss
    dm: DistributionMatchingLoss
    opt_vae: Optim
    opt_fake: Optim
    opt_d: Optim
    ema: EMA | None
    use_y: bool
    ref_shape: tuple[int, int, int]

    def checkpoint(self) -> dict[str, Any]:
        out = {"vae": self.vae, "fake": self.fake, "disc": self.disc, "opt_vae": self.opt_vae,
               "opt_fake": self.opt_fake, "opt_d": self.opt_d}
        return {**out, "ema": self.ema} if self.ema is not None else out


def make_state(ctx: StageContext, tok: nn.Module, ref_shape: tuple[int, int, int], real: nn.Module,
               disc: nn.Module, rloss: ReconstructionLoss, use_y: bool) -> DMDState:
    """Wire the DMD step's modules: the whole VAE trains (encoder included), the fake net starts as a copy
    of the frozen teacher (Sec. 3.2), optimisers from `dmd.*`."""
    cfg, d = ctx.cfg, ctx.cfg.dmd
    real = real.to(ctx.device).eval().requires_grad_(False)
    fake = copy.deepcopy(real).train().requires_grad_(True)
    tok.encoder.set_backbone_frozen(False)
    if hasattr(tok.encoder.backbone, "set_drop_path"):  # conv encoders (smoke presets) have no stochastic depth
        tok.encoder.backbone.set_drop_path(d.encoder_drop_path)
    head = build_head(latent_shape(cfg), ref_shape, d.head, hidden=d.head_hidden)
    vae = DMVAE(tok, head)
    dm = DistributionMatchingLoss(dm_weight=d.dm_weight, cfg_scale=d.cfg_scale)
    opt_vae = Optim(vae.parameters(), d, ctx.device)
    opt_fake = Optim(fake.parameters(), d, ctx.device, lr=d.fake_lr, grad_clip=d.fake_grad_clip)
    opt_d = Optim(disc.parameters(), d, ctx.device, lr=d.disc_lr, weight_decay=d.disc_weight_decay)
    ctx.channels_last(tok.decoder, disc)
    vae_w, fake_w, disc_w = ctx.wrap(vae), ctx.wrap(fake), ctx.wrap(disc)
    ema = None
    if d.tokenizer_out == "ema":
        ema = EMA(tok, cfg.tokenizer.ema_decay, cfg.run.ema_warmup)
        ema.shadow.to(ctx.device)
    return DMDState(ctx, tok, vae, vae_w, real, fake, fake_w, disc, disc_w, rloss, dm, opt_vae, opt_fake, opt_d,
                    ema, use_y, tuple(ref_shape))


def setup(ctx: StageContext) -> tuple[DMDState, ReferenceSet]:
    """The stage's inputs: reference set, verified teacher, the pretrained tokenizer and its discriminator."""
    cfg = ctx.cfg
    ref = ReferenceSet.load(artifact(cfg, "reference"))
    real = load_teacher(cfg, ref, ctx.device)
    tok_art = artifact(cfg, "tokenizer")
    tok = load_tokenizer(tok_art, ctx.device, trainable=True)
    disc = build_discriminator(cfg)
    disc.load_state_dict(load_torch(tok_art.file("disc.pt")))
    rloss = build_recon_loss(cfg, cfg.dmd.gan_start, ctx.device)
    return make_state(ctx, tok, ref.sample_shape, real, disc, rloss, dm_labels(cfg, ref)), ref


def step(s: DMDState, step: int, img: torch.Tensor, y_img: torch.Tensor) -> torch.Tensor:
    """One DMD iteration on this rank's `img (b, 3, H, W)`, labels `(b,)`: a VAE turn every `vae_every`
    steps (reconstruction + GAN + DM loss, then the discriminator), the fake score net every step.
    Returns the detached latents in the reference space `(b, C, h, w)` (the matching measure)."""
    ctx, d = s.ctx, s.ctx.cfg.dmd
    gb = d.batch_size
    y = y_img if s.use_y else None
    g = ctx.generator(step)
    lo, hi = annealed_t_range(step / max(d.total_steps - 1, 1), d.t_min, d.t_max, d.t_min_end) \
        if d.timestep_schedule == "anneal" else (d.t_min, d.t_max)
    t = ctx.slice(sample_t(gb, t_min=lo, t_max=hi, generator=g))
    eps = ctx.slice(torch.randn((gb, *s.ref_shape), generator=g))
    if step % d.vae_every == 0:  # VAE turn (App. A.3: once every k steps)
        s.vae.train()
        with ctx.autocast():
            rec, z, x = s.vae_w(img)
            loss_rec, stats = s.rloss.generator_loss(img, rec, step, s.disc, last_layer=s.tok.last_layer,
                                                     generator=g if ctx.device.type == "cpu" else None)
            loss_dm, dm_stats = s.dm(x, s.real, s.fake, y, t=t, eps=eps)
            loss = loss_rec + loss_dm
        if apply_update(ctx, step, loss, s.opt_vae, {**stats, **dm_stats, "loss/dm": loss_dm.detach(),
                                                       "dm/t_min": lo, "dm/t_max": hi}):
            if s.ema is not None:
                s.ema.update(s.tok)
        if s.rloss.gan_active(step):
            with ctx.autocast():
                d_loss, d_stats = s.rloss.discriminator_loss(s.disc_w, img, rec.detach())
            apply_update(ctx, step, d_loss, s.opt_d, d_stats)
        x_fake = x.detach()
    else:
        with torch.no_grad(), ctx.autocast():
            x_fake = s.vae.to_reference(s.tok.encode(img)).float()
    # Fake score model turn, every step (Eq. 8): flow matching on the current latents, detached.
    with ctx.autocast():
        drop = ctx.slice(torch.rand(gb, generator=g) < ctx.cfg.teacher.class_dropout)
        loss_f = fake_score_loss(lambda xt, tt, yy: s.fake_w(xt, tt, yy, force_drop=drop), x_fake.float(),
                                 y, t=ctx.slice(sample_t(gb, generator=g)),
                                 eps=ctx.slice(torch.randn((gb, *s.ref_shape), generator=g)))
    apply_update(ctx, step, loss_f, s.opt_fake, {"loss/fake": loss_f.detach()})
    return x_fake


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg, d = ctx.cfg, ctx.cfg.dmd
    s, ref = setup(ctx)
    state = s.checkpoint()
    start = resume(ctx, art, state)
    ds = build_dataset(cfg.data, "train")
    batches = ctx.image_batches(ds, d.batch_size, start, d.total_steps)
    last: dict = last_flushed(art)  # replaced by the loop's final flush unless it resumes at the end
    for i in progress(ctx, start, d.total_steps):
        ctx.maybe_inject_fault(i, art)
        img, y_img = next(batches)
        x_fake = step(s, i, img, y_img)

        def matching() -> dict:  # sliced Wasserstein between this batch's latents and reference samples
            ridx = torch.randint(0, len(ref), (x_fake.shape[0],), generator=ctx.generator(i))
            return {"match/swd": sliced_wasserstein(x_fake.float().cpu(), ref.x[ridx], seed=i)}
        last = loop_tail(ctx, art, i, d.total_steps, d.batch_size, state, extra=matching) or last
    if ctx.is_main:
        save_torch(art.file("head.pt"), s.vae.head.state_dict())
        save_torch(art.file("fake.pt"), s.fake.state_dict())
    extra = {"match/swd": last.get("match/swd"), "loss/dm": last.get("loss/dm"), "loss/rec": last.get("loss/rec"),
             "dm_weight": s.dm.dm_weight, "use_labels": s.use_y, "tokenizer_out": d.tokenizer_out}
    out = s.ema.shadow if s.ema is not None else s.tok.eval()
    return finish_tokenizer(ctx, art, "ae", out, s.disc, ds, extra)


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Run DMD for this row (reused when its artifact is finished)."""
    return run_stage("dmd", cfg, opts)
