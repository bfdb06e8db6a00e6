"""The distribution-matching objective (paper Eq. 9) and the Sec. 3.3 variants of the 2D toy study.

Conventions (`objectives.flow`): t = 0 noise, t = 1 data, x_t = t x + (1 - t) eps; score nets are
velocity nets `net(x_t, t, y) -> v`; clean estimate D = x_t + (1 - t) v; y = None is the null class.

DM gradient on latents x (`dm_gradient`, official `train_dmd.py`):

    p_real = x - D_real,  p_fake = x - D_fake,  g = (p_real - p_fake) / w,  w = mean |p_real| per sample

and `loss = dm_weight * 0.5 * mean((x - stopgrad(x - g))^2)`, so dloss/dx = dm_weight * g / numel(x).
Since s = (t D - x_t) / (1 - t)^2, g = -(1 - t)^2 / t * (s_real - s_fake) / w: gradient descent moves x
along s_real - s_fake (towards the reference, away from the current latent distribution). The nets
are never differentiated (no Jacobian; Eq. 9, DMD, Yin et al. 2024).

The variants (`OBJECTIVES`, official `toy_example_2d/dmd.py` loss types) share one signature
`fn(x, real_net, fake_net, y, t, eps) -> scalar loss`; their gradients reach `x` only: the nets'
parameters are taken out of the graph (`gradients.frozen`), so backward never writes their `.grad`
and the fake net trains only on `fake_score_loss` (Eq. 8). The nets are evaluated as given: put them
in eval mode (LightningDiT drops labels at random in train mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dmvae_study.objectives.flow import FlowMatchingLoss, interpolate, sample_t, velocity_to_denoised, velocity_to_score
from dmvae_study.objectives.gradients import frozen

VelocityNet = Callable[..., torch.Tensor]


def guided_velocity(net: VelocityNet, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                    cfg_scale: float = 1.0) -> torch.Tensor:
    """`v_null + cfg_scale (v_cond - v_null)` on all channels (official DMD CFG, App. A.3: scale 5);
    plain `net(x_t, t, y)` when `cfg_scale == 1` or `y is None`. A net with `forward_cfg` (LightningDiT)
    is called through it: one batched pass, and no random label dropout on the conditional half."""
    if hasattr(net, "forward_cfg"):
        return net.forward_cfg(x_t, t, y, cfg_scale)
    if cfg_scale == 1.0 or y is None:
        return net(x_t, t, y)
    v_cond, v_null = net(x_t, t, y), net(x_t, t, None)
    return v_null + cfg_scale * (v_cond - v_null)


def dm_gradient(x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_real: torch.Tensor, v_fake: torch.Tensor,
                normalize: bool = True, w_min: float = 1e-6) -> torch.Tensor:
    """The DM update direction g `(B, ...)` of Eq. 9 (descent moves x along -g, i.e. along s_real - s_fake).

    `normalize`: divide by the DMD weight w = mean |x - D_real| over all non-batch dims, per sample
    (official `train_dmd.py`; the official toy uses no weight). Nan-safe: w is clamped to >= w_min and
    non-finite entries of g become 0, so a bad sample cannot poison the others or the step."""
    d_real, d_fake = velocity_to_denoised(v_real, x_t, t), velocity_to_denoised(v_fake, x_t, t)
    p_real, p_fake = x - d_real, x - d_fake
    g = p_real - p_fake
    if normalize:
        w = p_real.abs().reshape(x.shape[0], -1).mean(dim=1).clamp_min(w_min)
        g = g / w.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _surrogate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`0.5 * mean((x - stopgrad(x - g))^2)`: value 0.5 mean(g^2), gradient g / numel(x)."""
    return 0.5 * F.mse_loss(x, (x - g).detach())


@dataclass
class DistributionMatchingLoss:
    """Eq. 9 for the VAE turn of DMD training (Sec. 3.1, App. A.3).

    `__call__(x, real_net, fake_net, y, t, generator, eps)`: `x (B, ...)` the (head-projected,
    normalised) latents with grad; `t (B,)` given (e.g. annealed by the caller) or drawn uniformly in
    [t_min, t_max]; returns (loss, stats) with stats detached tensors: loss/dm, dm/grad_norm (mean
    per-sample L2 norm of g), dm/t_mean, dm/w_mean. For the annealing (Sec. 5.1; [0,1] -> [0.5,1] here, t = 1 data) pass
    `t = sample_t(B, t_min=lo, t_max=hi)` with `(lo, hi) = annealed_t_range(progress)`.
    """

    dm_weight: float = 10.0
    cfg_scale: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    normalize: bool = True
    w_min: float = 1e-6

    def __call__(self, x: torch.Tensor, real_net: VelocityNet, fake_net: VelocityNet, y: torch.Tensor | None = None,
                 t: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 eps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = x.shape[0]
        if t is None:
            t = sample_t(B, t_min=self.t_min, t_max=self.t_max, device=x.device, generator=generator)
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 latents: the update is formed in fp32
        t = t.to(device=x.device, dtype=dtype)
        xd = x.detach().to(dtype)
        if eps is None:
            eps = torch.randn(xd.shape, device=x.device, dtype=dtype, generator=generator)
        x_t = interpolate(xd, eps.to(dtype), t)
        with torch.no_grad():
            v_real = guided_velocity(real_net, x_t, t, y, self.cfg_scale).to(dtype)
            v_fake = guided_velocity(fake_net, x_t, t, y, self.cfg_scale).to(dtype)
            g = dm_gradient(xd, x_t, t, v_real, v_fake, self.normalize, self.w_min)
            w = (xd - velocity_to_denoised(v_real, x_t, t)).abs().reshape(B, -1).mean(dim=1)
        loss = self.dm_weight * _surrogate(x.to(dtype), g)
        stats = {"loss/dm": loss.detach(), "dm/grad_norm": g.reshape(B, -1).norm(dim=1).mean(),
                 "dm/t_mean": t.mean(), "dm/w_mean": w.mean()}
        return loss, stats


def fake_score_loss(fake_net: VelocityNet, x: torch.Tensor, y: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                    eps: torch.Tensor | None = None, fm: FlowMatchingLoss | None = None) -> torch.Tensor:
    """Eq. 8: flow-matching loss of the fake net on the current latents `x.detach()` `(B, ...)`; only the
    fake net receives gradients. `fm` sets the time law (default uniform on [0, 1], as the official)."""
    loss, _ = (fm or FlowMatchingLoss())(fake_net, x.detach(), y, generator=generator, t=t, eps=eps)
    return loss


# ---- Sec. 3.3 variants (2D toy study, Fig. 3) --------------------------------------------------------------

Objective = Callable[[torch.Tensor, Any, Any, Any, torch.Tensor, torch.Tensor], torch.Tensor]


def _dm(normalize: bool) -> Objective:
    def fn(x, real_net, fake_net, y, t, eps):
        xd = x.detach()
        x_t = interpolate(xd, eps, t)
        with torch.no_grad():
            g = dm_gradient(xd, x_t, t, real_net(x_t, t, y), fake_net(x_t, t, y), normalize)
        return _surrogate(x, g)
    fn.__doc__ = ("Eq. 9, DM (ours): descent along s_real - s_fake, " +
                  ("DMD-normalised per sample (main-training form)." if normalize else
                   "unnormalised (official toy form, Fig. 3b)."))
    return fn


def _score_push(which: str, sign: float) -> Objective:
    def fn(x, real_net, fake_net, y, t, eps):
        net = real_net if which == "real" else fake_net
        x_t = interpolate(x.detach(), eps, t)
        with torch.no_grad():
            s = torch.nan_to_num(velocity_to_score(net(x_t, t, y), x_t, t), nan=0.0, posinf=0.0, neginf=0.0)
        return _surrogate(x, -sign * s)
    fn.__doc__ = f"Descent along {'+' if sign > 0 else '-'}s_{which} only (official score_{'teacher' if which == 'real' else 'student'}{'' if sign > 0 else '_minus'})."
    return fn


def _fm_loss(which: str, placement: int) -> Objective:
    """Flow-matching loss of one net on the moving samples, minimised w.r.t. x; placement 1: gradient only
    through the net's input x_t (target x - eps stopped); 2: only through the target (net output
    stopped); 3: both (official loss_teacher{k} / loss_student{k})."""
    def fn(x, real_net, fake_net, y, t, eps):
        net = real_net if which == "real" else fake_net
        x_t = interpolate(x, eps, t)
        target = x - eps
        with frozen(real_net, fake_net):
            if placement == 2:
                with torch.no_grad():
                    v = net(x_t.detach(), t, y)
            else:
                v = net(x_t, t, y)
        if placement == 1:
            target = target.detach()
        return 0.5 * ((v - target) ** 2).mean()
    fn.__doc__ = f"{which}-score maximisation, stop-gradient placement {placement} (Fig. 3 " + \
        {"real": "d, e, f", "fake": "g, h, i"}[which] + ")."
    return fn


def _score_diff(placement: int) -> Objective:
    """mean (v_real - v_fake)^2 minimised w.r.t. x; placement 1: gradient through the fake net only,
    2: through the real net only, 3: both (official score_teacher_student{k}; Fig. 3 j, k, l)."""
    def fn(x, real_net, fake_net, y, t, eps):
        x_t = interpolate(x, eps, t)
        with frozen(real_net, fake_net):
            v_r = real_net(x_t.detach() if placement == 1 else x_t, t, y)
            v_f = fake_net(x_t.detach() if placement == 2 else x_t, t, y)
        if placement == 1:
            v_r = v_r.detach()
        if placement == 2:
            v_f = v_f.detach()
        return ((v_r - v_f) ** 2).mean()
    fn.__doc__ = f"Score-difference minimisation, placement {placement}."
    return fn


def _loss_diff(x, real_net, fake_net, y, t, eps):
    """Loss-difference minimisation: FM loss of the real net minus that of the fake net on the same
    (x_t, target), gradient through both nets' inputs (their Jacobians; official loss_teacher_student1)."""
    x_t = interpolate(x, eps, t)
    target = (x - eps).detach()
    with frozen(real_net, fake_net):
        v_r, v_f = real_net(x_t, t, y), fake_net(x_t, t, y)
    return 0.5 * ((v_r - target) ** 2).mean() - 0.5 * ((v_f - target) ** 2).mean()


OBJECTIVES: dict[str, Objective] = {
    "dm": _dm(normalize=False),
    "dm_normalized": _dm(normalize=True),
    **{f"real_score_{k}": _fm_loss("real", k) for k in (1, 2, 3)},
    **{f"fake_score_{k}": _fm_loss("fake", k) for k in (1, 2, 3)},
    **{f"score_diff_{k}": _score_diff(k) for k in (1, 2, 3)},
    "score_diff": _score_diff(3),   # the plain "minimise ||v_real - v_fake||^2" of Sec. 3.3 = placement 3
    "loss_diff": _loss_diff,
    "real_score_push": _score_push("real", +1.0),
    "fake_score_push": _score_push("fake", +1.0),
    "fake_score_repel": _score_push("fake", -1.0),
}
# The variants the paper draws in Fig. 3 / Sec. 3.3: DM, each score objective with its three stop-gradient
# placements, and loss-difference minimisation (the toy study's rows).
FIG3_OBJECTIVES: tuple[str, ...] = tuple(n for n in OBJECTIVES if n in ("dm", "loss_diff") or n[-2:] in ("_1", "_2", "_3"))

__all__ = ["DistributionMatchingLoss", "FIG3_OBJECTIVES", "OBJECTIVES", "dm_gradient", "fake_score_loss", "guided_velocity"]
