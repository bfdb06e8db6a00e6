"""Samplers for flow-matching velocity models: Euler / Heun ODE, Euler-Maruyama SDE, classifier-free guidance.

Convention (objectives/flow.py): t = 0 noise, t = 1 data; every sampler integrates t from 0 up to 1.
A velocity function is `velocity_fn(x (B, ...), t (B,)) -> v (B, ...)`; `guided` builds one from a
LightningDiT. Samplers are kept apart from models and objectives (diffusers' scheduler split).

The SDE matches the official DMVAE stage-2 sampler (`sample_50k.py`: mode SDE, Euler, diffusion form
"sigma", last step "Mean" of size 0.04, 250 steps), derived from SiT's `transport/`:

    dx = [v + w(t) s(x, t)] dt + sqrt(2 w(t)) dW,    w(t) = (1 - t),    s = (t v - x) / (1 - t),

which has the same marginals p_t as the ODE dx = v dt for any w >= 0 (the Langevin term w s and the
noise cancel in Fokker-Planck). With w = 1 - t the product w s = t v - x, so the drift is evaluated
without any division, and t = 1 (where s is undefined) is never visited by the noisy steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from dmvae_study.configlib import Section, field
from dmvae_study.objectives.flow import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SamplerKind = Literal["ode_euler", "ode_heun", "sde"]


def _steps_iter(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm
    return tqdm(range(n), desc=desc, leave=False)


def ode_time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Times `(steps + 1,)` float64 from 0 to 1, shifted toward noise for `shift > 1` (as the official ODE)."""
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)


def sde_time_grid(steps: int, shift: float = 1.0, last_step_size: float = 0.04) -> torch.Tensor:
    """Times `(steps,)` float64 from 0 to `1 - last_step_size` where the SDE is evaluated.

    The official grid is `linspace(0, 1 - last_step_size, steps)` (it ignores `time_dist_shift`); a shift
    here reshapes the grid inside the same interval, so `shift=1` reproduces the official one.
    """
    return (1.0 - last_step_size) * shift_time(torch.linspace(0.0, 1.0, steps, dtype=torch.float64), shift)


@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, *,
               method: Literal["euler", "heun"] = "euler", shift: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from `noise (B, ...)` at t=0 to data at t=1 in `steps` intervals.

    Euler uses `steps` evaluations; Heun (2nd order, trapezoid corrector on every interval, including the
    last: the velocity is well defined at t=1) uses `2 * steps`. The official ODE's `num_steps` counts grid
    points, i.e. `steps + 1` here.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    grid = ode_time_grid(steps, shift).tolist()
    x, B = noise, noise.shape[0]
    for i in _steps_iter(steps, progress, f"ODE {method}"):
        t0, t1 = grid[i], grid[i + 1]
        v0 = velocity_fn(x, torch.full((B,), t0, device=x.device, dtype=x.dtype))
        if method == "euler":
            x = x + (t1 - t0) * v0
        else:
            v1 = velocity_fn(x + (t1 - t0) * v0, torch.full((B,), t1, device=x.device, dtype=x.dtype))
            x = x + 0.5 * (t1 - t0) * (v0 + v1)
    return x


@torch.no_grad()
def sample_sde(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, *, shift: float = 1.0,
               last_step_size: float = 0.04, diffusion_norm: float = 1.0,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the SDE of the module docstring, from `noise (B, ...)` at t=0 to data.

    `steps` evaluations (the official count): `steps - 1` noisy steps on `sde_time_grid`, then one
    deterministic "mean" step of size `last_step_size` to t=1 (no noise is added at the end, so the output
    is the mean of the last transition). `last_step_size=0` runs all `steps - 1` noisy steps up to t=1
    (w(1) = 0 there) and skips the extra step. `diffusion_norm` scales w(t).
    """
    if steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2, got {steps}")
    if not 0.0 <= last_step_size < 1.0:
        raise ValueError(f"last_step_size must lie in [0, 1), got {last_step_size}")
    grid = sde_time_grid(steps, shift, last_step_size).tolist()
    x, B = noise, noise.shape[0]
    gen_device = generator.device if generator is not None else x.device  # a CPU generator may drive GPU noise

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        v = velocity_fn(x, torch.full((B,), t, device=x.device, dtype=x.dtype))
        return v + diffusion_norm * (t * v - x)  # v + w(t) s(x, t), w = norm (1 - t), simplified

    for i in _steps_iter(steps - 1, progress, "SDE"):
        t, dt = grid[i], grid[i + 1] - grid[i]
        dw = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        x = x + drift(x, t) * dt + math.sqrt(2.0 * diffusion_norm * (1.0 - t) * dt) * dw
    if last_step_size > 0:
        x = x + drift(x, grid[-1]) * last_step_size
    return x


def guided(model: torch.nn.Module, y: torch.Tensor | None, cfg_scale: float = 1.0,
           interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
    """Velocity function of a LightningDiT with classifier-free guidance on a time interval.

    Guidance `v_null + cfg_scale (v_cond - v_null)` applies where `interval[0] <= t <= interval[1]`
    (t = 0 noise), the plain conditional velocity elsewhere; the official LightningDiT's
    `cfg_interval_start=s` is `interval=(s, 1.0)` here. `y (B,)` labels, or None for unconditional.
    Labels are never randomly dropped here, whatever the model's train/eval mode.
    """
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg interval must satisfy 0 <= lo <= hi <= 1, got {interval}")

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y is None or cfg_scale == 1.0:
            return model.forward_cfg(x, t, y, 1.0)
        inside = (t >= lo) & (t <= hi)
        if not bool(inside.any()):
            return model.forward_cfg(x, t, y, 1.0)
        w = torch.where(inside, torch.full_like(t, cfg_scale), torch.ones_like(t))
        return model.forward_cfg(x, t, y, w)

    return velocity_fn


@dataclass
class Sampler(Section):
    """Sampler choice as a config section; `Sampler()` is the paper's default (250-step SDE, no CFG)."""

    kind: SamplerKind = field("sde", doc="ode_euler, ode_heun, or sde (official Euler-Maruyama)")
    steps: int = field(250, doc="number of steps (paper: 250); Heun uses 2 evaluations per step")
    cfg_scale: float = field(1.0, doc="classifier-free guidance scale (1 = off; paper default)")
    cfg_interval: tuple[float, float] = field((0.0, 1.0), doc="t range (0 = noise) where guidance applies")
    shift: float = field(1.0, doc="timestep shift toward noise (> 1 spends more steps near noise)")
    last_step_size: float = field(0.04, doc="SDE: size of the final deterministic mean step")

    def validate(self) -> None:
        self.check(self.steps >= (2 if self.kind == "sde" else 1), "steps", "too few steps for this sampler")
        self.check(self.cfg_scale >= 1.0, "cfg_scale", "must be >= 1 (1 = no guidance)")
        lo, hi = self.cfg_interval
        self.check(0.0 <= lo <= hi <= 1.0, "cfg_interval", "need 0 <= lo <= hi <= 1")
        self.check(self.shift > 0.0, "shift", "must be positive")
        self.check(0.0 <= self.last_step_size < 1.0, "last_step_size", "must lie in [0, 1)")

    def __call__(self, model: torch.nn.Module, noise: torch.Tensor, y: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Samples `(B, ...)` from `noise` of the same shape, conditioned on labels `y (B,)` or None."""
        fn = guided(model, y, self.cfg_scale, self.cfg_interval)
        if self.kind == "sde":
            return sample_sde(fn, noise, self.steps, shift=self.shift, last_step_size=self.last_step_size,
                              generator=generator, progress=progress)
        return sample_ode(fn, noise, self.steps, method=self.kind.removeprefix("ode_"), shift=self.shift,
                          progress=progress)


__all__ = ["Sampler", "SamplerKind", "VelocityFn", "guided", "ode_time_grid", "sample_ode", "sample_sde",
           "sde_time_grid"]
