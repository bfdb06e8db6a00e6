"""Flow matching on the linear path and the velocity / score / clean-estimate conversions.

Convention (paper Eq. 5, official code): t = 0 is noise, t = 1 is data,

    x_t = t * x + (1 - t) * eps,        target velocity u = x - eps.

For a velocity prediction v(x_t, t):

    clean estimate   D(x_t) = x_t + (1 - t) * v
    score            s(x_t) = (t * v - x_t) / (1 - t)

(the score follows from E[eps | x_t] = x_t - t * D and s = -E[eps | x_t] / (1 - t)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

TimeSampling = Literal["uniform", "logit_normal"]


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times `(B,)` to broadcast against `x` of shape `(B, ...)`."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point on the linear path, `x_t = t x + (1 - t) eps`. `x`, `eps`: `(B, ...)`; `t`: `(B,)`."""
    tt = expand_t(t, x)
    return tt * x + (1.0 - tt) * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Regression target of the linear path, `u = x - eps`."""
    return x - eps


def velocity_to_denoised(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean estimate `D = x_t + (1 - t) v`."""
    return x_t + (1.0 - expand_t(t, x_t)) * v


def velocity_to_score(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of p_t, `s = (t v - x_t) / (1 - t)`; undefined at t = 1 (pure data)."""
    tt = expand_t(t, x_t)
    return (tt * v - x_t) / (1.0 - tt)


def score_to_velocity(s: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `velocity_to_score`: `v = ((1 - t) s + x_t) / t`; undefined at t = 0."""
    tt = expand_t(t, x_t)
    return ((1.0 - tt) * s + x_t) / tt


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift toward noise for shift > 1 (SD3 / LightningDiT convention in t=data=1 form).

    With t = 0 noise, a shift s maps t -> t / (t + s (1 - t)), spending more time near noise.
    """
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


def sample_t(
    batch: int,
    *,
    kind: TimeSampling = "uniform",
    t_min: float = 0.0,
    t_max: float = 1.0,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times `(B,)` in [t_min, t_max]: uniform or logit-normal, then optionally shifted."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if kind == "uniform":
        u = torch.rand(batch, device=device, generator=generator)
    elif kind == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, device=device, generator=generator))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; choose 'uniform' or 'logit_normal'")
    u = shift_time(u, shift)
    return t_min + (t_max - t_min) * u


def annealed_t_range(progress: float, t_min: float = 0.0, t_max: float = 1.0,
                     t_min_end: float = 0.5) -> tuple[float, float]:
    """DM timestep range `(lo, hi)` under the paper's annealing (Sec. 5.1, Table 2).

    The paper, following ProlificDreamer (whose t is the *noise level*), contracts the range [0, 1]
    linearly to [0, 0.5] "focusing on more precise, low-noise matching in the later stages". Here
    t = 1 is data, so the same schedule raises the lower end: [t_min, t_max] -> [t_min_end, t_max]
    (default [0, 1] -> [0.5, 1]) as `progress` goes 0 -> 1."""
    p = min(max(progress, 0.0), 1.0)
    return t_min + (t_min_end - t_min) * p, t_max


@dataclass
class FlowMatchingLoss:
    """Flow-matching loss (paper Eq. 5/8): E || v(x_t, t, y) - (x - eps) ||^2, mean over all elements.

    Call with `net(x_t, t, y) -> v` and clean samples `x` `(B, ...)`; returns (loss, t).
    """

    time_sampling: TimeSampling = "uniform"
    shift: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __call__(
        self,
        net: Callable[..., torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduce: bool = True,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`t` `(B,)` and `eps` `(B, ...)` may be given (drawn for a global batch, then sliced per rank)."""
        if t is None:
            t = sample_t(x.shape[0], kind=self.time_sampling, t_min=self.t_min, t_max=self.t_max,
                         shift=self.shift, device=x.device, generator=generator)
        if eps is None:
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t = interpolate(x, eps, t)
        v = net(x_t, t, y)
        err = (v.float() - velocity_target(x, eps).float()) ** 2
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
        return (per_sample.mean() if reduce else per_sample), t


def gaussian_velocity(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact velocity field of the linear path for data N(mu, sigma^2 I) (a closed form for tests).

    x_t = t x + (1-t) eps is Gaussian with mean t mu and variance a = t^2 sigma^2 + (1-t)^2, and
    E[x - eps | x_t] = mu + (t sigma^2 - (1-t)) / a * (x_t - t mu).
    """
    tt = expand_t(t, x_t)
    a = tt**2 * sigma**2 + (1 - tt) ** 2
    return mu + (tt * sigma**2 - (1 - tt)) / a * (x_t - tt * mu)


def gaussian_score(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytic score of p_t for data N(mu, sigma^2 I): -(x_t - t mu) / (t^2 sigma^2 + (1-t)^2)."""
    tt = expand_t(t, x_t)
    return -(x_t - tt * mu) / (tt**2 * sigma**2 + (1 - tt) ** 2)


__all__ = [
    "FlowMatchingLoss", "annealed_t_range", "expand_t", "gaussian_score", "gaussian_velocity",
    "interpolate", "sample_t", "score_to_velocity", "shift_time", "velocity_target",
    "velocity_to_denoised", "velocity_to_score",
]
