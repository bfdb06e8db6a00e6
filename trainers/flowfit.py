"""Flow-matching training of a LightningDiT on an in-memory sample set: the loop the teacher
(App. A.2) and the stage-2 generator (App. A.5) share, as `setup` + `step`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dmvae_study.build import build_dit
from dmvae_study.config import GeneratorConfig, TeacherConfig
from dmvae_study.objectives.flow import FlowMatchingLoss, sample_t
from dmvae_study.store import ArtifactDir
from trainers.common import EMA, Optim, StageContext, apply_update, last_flushed, loop_tail, progress, resume


@dataclass
class FlowState:
    ctx: StageContext
    dcfg: TeacherConfig | GeneratorConfig
    net: nn.Module
    net_w: nn.Module
    ema: EMA
    opt: Optim
    fm: FlowMatchingLoss
    sample_shape: tuple[int, ...]

    def checkpoint(self) -> dict[str, Any]:
        return {"net": self.net, "ema": self.ema, "opt": self.opt}


def setup(ctx: StageContext, dcfg: TeacherConfig | GeneratorConfig, sample_shape: tuple[int, int, int],
          num_classes: int) -> FlowState:
    """A fresh DiT of `dcfg` for samples `(C, H, W)`, its EMA, optimiser (`dcfg` lr / betas / weight decay /
    clip / warmup) and the flow-matching loss with `dcfg.time_sampling`."""
    net = build_dit(dcfg, sample_shape, num_classes)
    ema = EMA(net, dcfg.ema_decay, ctx.cfg.run.ema_warmup)
    opt = Optim(net.parameters(), dcfg, ctx.device)
    net_w = ctx.wrap(net)
    if ctx.cfg.run.compile:  # optional: fuses the DiT's elementwise work around the flash-attention kernels
        net_w = torch.compile(net_w)
    ema.shadow.to(ctx.device)
    ctx.local_batch(dcfg.batch_size)
    return FlowState(ctx, dcfg, net, net_w, ema, opt, FlowMatchingLoss(time_sampling=dcfg.time_sampling),
                     tuple(sample_shape))


def step(s: FlowState, step: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """One flow-matching step (Eq. 5) on this rank's samples `x (b, C, H, W)`, labels `(b,)`; t, eps and the
    CFG label dropout are drawn for the global batch and sliced, so N ranks equal one."""
    ctx, gb = s.ctx, s.dcfg.batch_size
    g = ctx.generator(step)
    t = ctx.slice(sample_t(gb, kind=s.dcfg.time_sampling, generator=g))
    eps = ctx.slice(torch.randn((gb, *s.sample_shape), generator=g))
    drop = ctx.slice(torch.rand(gb, generator=g) < s.dcfg.class_dropout)  # CFG label dropout, rank-exact
    with ctx.autocast():
        loss, _ = s.fm(lambda xt, tt, yy: s.net_w(xt, tt, yy, force_drop=drop), x, y, t=t, eps=eps)
    if apply_update(ctx, step, loss, s.opt, {"loss/fm": loss}):
        s.ema.update(s.net)


def fit_flow_model(ctx: StageContext, art: ArtifactDir, x_all: torch.Tensor, y_all: torch.Tensor | None,
                   num_classes: int, dcfg: TeacherConfig | GeneratorConfig,
                   on_log: Callable[[int, nn.Module], dict] | None = None) -> tuple[nn.Module, dict]:
    """Train a DiT by flow matching on `x_all` `(N, C, H, W)` with labels `y_all` `(N,)`; resumes from the
    newest checkpoint in `art`. Returns the EMA network and the last reduced metrics."""
    s = setup(ctx, dcfg, tuple(x_all.shape[1:]), num_classes)
    state = s.checkpoint()
    start = resume(ctx, art, state)
    last: dict = last_flushed(art)  # replaced by the loop's final flush unless it resumes at the end
    for i in progress(ctx, start, dcfg.total_steps):
        ctx.maybe_inject_fault(i, art)
        idx = ctx.batch_indices(x_all.shape[0], dcfg.batch_size, i)
        x = x_all[idx].to(ctx.device, non_blocking=True).float()
        y = y_all[idx].to(ctx.device) if y_all is not None else None
        step(s, i, x, y)
        extra = (lambda: on_log(i + 1, s.ema.shadow)) if on_log is not None else None
        last = loop_tail(ctx, art, i, dcfg.total_steps, dcfg.batch_size, state, extra=extra) or last
    return s.ema.shadow, last
