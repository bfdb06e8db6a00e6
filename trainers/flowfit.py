"""Flow-matching training of a LightningDiT on an in-memory sample set: the loop the teacher
(App. A.2) and the stage-2 generator (App. A.5) share."""

from __future__ import annotations

from typing import Callable

import torch

from dmvae_study.build import build_dit
from dmvae_study.config import GeneratorConfig, TeacherConfig
from dmvae_study.objectives.flow import FlowMatchingLoss, sample_t
from dmvae_study.store import ArtifactDir
from trainers.common import EMA, StageContext, adamw, progress, resume, save


def fit_flow_model(
    ctx: StageContext,
    art: ArtifactDir,
    x_all: torch.Tensor,
    y_all: torch.Tensor | None,
    num_classes: int,
    dcfg: TeacherConfig | GeneratorConfig,
    on_log: Callable[[int, dict, torch.nn.Module], dict] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train a DiT by flow matching (Eq. 5) on `x_all` `(N, C, H, W)` with labels `y_all` `(N,)`.

    Returns the EMA network and the last reduced metrics. Resumes from the newest checkpoint in `art`.
    """
    run = ctx.cfg.run
    net = build_dit(dcfg, tuple(x_all.shape[1:]), num_classes)
    ema = EMA(net, dcfg.ema_decay, run.ema_warmup)
    opt = adamw(net.parameters(), dcfg.lr, ctx.device, betas=(0.9, 0.95))
    net_w = ctx.wrap(net)
    if run.compile:  # optional: fuses the DiT's elementwise work around the flash-attention kernels
        net_w = torch.compile(net_w)
    ema.shadow.to(ctx.device)
    start = resume(ctx, art, {"net": net, "ema": ema, "opt": opt})
    fm = FlowMatchingLoss(time_sampling=dcfg.time_sampling)
    gb = dcfg.batch_size
    ctx.local_batch(gb)
    last: dict = {}
    for step in progress(ctx, start, dcfg.total_steps):
        ctx.maybe_inject_fault(step, art)
        idx = ctx.batch_indices(x_all.shape[0], gb, step)
        x = x_all[idx].to(ctx.device, non_blocking=True).float()
        y = y_all[idx].to(ctx.device) if y_all is not None else None
        g = ctx.generator(step)
        t = ctx.slice(sample_t(gb, kind=dcfg.time_sampling, generator=g))
        eps = ctx.slice(torch.randn((gb, *x_all.shape[1:]), generator=g))
        drop = ctx.slice(torch.rand(gb, generator=g) < dcfg.class_dropout)  # CFG label dropout, rank-exact
        with ctx.autocast():
            loss, _ = fm(lambda xt, tt, yy: net_w(xt, tt, yy, force_drop=drop), x, y, t=t, eps=eps)
        if ctx.finite_or_skip(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            ema.update(net)
            ctx.log(step, {"loss/fm": loss, "grad_norm": gn})
        if (step + 1) % run.log_every == 0 or step + 1 == dcfg.total_steps:
            extra = on_log(step + 1, {}, ema.shadow) if on_log is not None else None
            last = ctx.flush(step + 1, art, gb, extra=extra)
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == dcfg.total_steps:
            save(ctx, art, step + 1, {"net": net, "ema": ema, "opt": opt})
    return ema.shadow, last
