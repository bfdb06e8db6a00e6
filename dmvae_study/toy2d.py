"""The 2D toy study (paper Sec. 3.3, Fig. 3, App. B): the S-shape reference, its measurements,
and the loop that moves 1536 learnable points with one distribution-matching objective.

The reference (DESIGN.md, official `sshpae.py` facts): t ~ U(-1, 1); skeleton
x = 0.85 sin(pi t), y = 0.85 t - 0.15 sin(2 pi t); N(0, 0.06) noise along the curve normal;
isotropic N(0, 0.03 (0.4 + 0.6 |t|)) noise; y flipped; clipped to [-1, 1]^2.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dmvae_study.configlib import Section, field
from dmvae_study.objectives.flow import FlowMatchingLoss, annealed_t_range, sample_t

AMP, VSCALE, SKEW, THICK, DIFFUSE = 0.85, 0.85, 0.15, 0.06, 0.03


def skeleton(t: np.ndarray) -> np.ndarray:
    """Centre curve `(n, 2)` at parameters t in [-1, 1], y already flipped."""
    x = AMP * np.sin(np.pi * t)
    y = VSCALE * t - SKEW * np.sin(2 * np.pi * t)
    return np.stack([x, -y], axis=1)


def sample_sshape(n: int, seed: int = 0) -> torch.Tensor:
    """`n` reference samples `(n, 2)` float32."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1.0, 1.0, size=n)
    x = AMP * np.sin(np.pi * t)
    y = VSCALE * t - SKEW * np.sin(2 * np.pi * t)
    dx = AMP * np.pi * np.cos(np.pi * t)
    dy = VSCALE - 2 * np.pi * SKEW * np.cos(2 * np.pi * t)
    norm = np.hypot(dx, dy) + 1e-8
    nx, ny = -dy / norm, dx / norm  # unit normal (tangent rotated by 90 degrees)
    r = rng.normal(0.0, THICK, size=n)
    pts = np.stack([x + r * nx, y + r * ny], axis=1)
    pts += rng.normal(0.0, 1.0, size=(n, 2)) * (DIFFUSE * (0.4 + 0.6 * np.abs(t)))[:, None]
    pts[:, 1] *= -1
    return torch.from_numpy(np.clip(pts, -1.0, 1.0)).float()


def arc_bins(points: torch.Tensor, bins: int = 40, max_dist: float = 0.15) -> torch.Tensor:
    """Arc-length bin `(n,)` of each point's nearest skeleton point, -1 when farther than max_dist."""
    t = np.linspace(-1, 1, 2001)
    sk = skeleton(t)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(sk, axis=0), axis=1))])
    bin_of = np.minimum((arc / arc[-1] * bins).astype(int), bins - 1)
    d = torch.cdist(points.double(), torch.from_numpy(sk))
    dmin, j = d.min(dim=1)
    out = torch.from_numpy(bin_of)[j]
    out[dmin > max_dist] = -1
    return out


def coverage(points: torch.Tensor, bins: int = 40, max_dist: float = 0.15) -> float:
    """Share of the S-curve's arc-length bins that hold at least one point."""
    b = arc_bins(points, bins, max_dist)
    return float(torch.unique(b[b >= 0]).numel()) / bins


def spread(points: torch.Tensor) -> tuple[float, float]:
    """(mean nearest-neighbour distance, mean pairwise distance): both shrink under collapse."""
    d = torch.cdist(points.double(), points.double())
    n = d.shape[0]
    nn_d = (d + torch.eye(n, dtype=d.dtype) * 1e9).min(dim=1).values.mean()
    return float(nn_d), float(d.sum() / (n * (n - 1)))


@dataclass
class ToyConfig(Section):
    real_size: str = field("Mini", doc="LightningDiT size of the real (and fake) score net on one token")
    real_steps: int = field(4000, doc="flow-matching steps of the real score model")
    real_batch: int = field(1024, doc="reference samples per real-model step")
    real_lr: float = field(1e-3, doc="real-model learning rate")
    num_points: int = field(1536, doc="learnable points, initialised uniform in [-1.5, 1.5]^2")
    steps: int = field(3000, doc="matching steps (points move every `points_every`, the fake net every step)")
    points_every: int = field(5, doc="points update period (paper's alternating schedule)")
    lr_points: float = field(1e-2, doc="Adam learning rate of the points")
    lr_fake: float = field(1e-4, doc="Adam learning rate of the fake score net")
    t_min: float = field(0.0, doc="lower end of the objective's time range")
    t_max: float = field(1.0, doc="upper end of the objective's time range")
    anneal: bool = field(False, doc="contract [t_min, t_max] to [0.5, t_max] linearly (toward data, t = 1; Sec. 5.1)")
    objectives: tuple[str, ...] = field(("dm",), doc="objective variants to run (dmvae_study.objectives.dm.OBJECTIVES)")
    eval_every: int = field(100, doc="measure distances every N steps")
    threshold: float = field(0.05, doc="energy distance counted as reached for `steps_to_threshold`")
    eval_samples: int = field(4096, doc="fresh reference samples for the measurements")
    seed: int = field(0, doc="seed of the points, the reference draws and the noise")


def build_toy_net(size: str) -> torch.nn.Module:
    """LightningDiT on one 2-channel token, unconditional (one class)."""
    from dmvae_study.models.lightningdit import build_lightningdit
    return build_lightningdit(size, in_channels=2, input_size=1, patch_size=1, num_classes=1, class_dropout=0.0)


def as_token(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], 2, 1, 1)


def train_real_model(cfg: ToyConfig, progress: bool = False) -> tuple[torch.nn.Module, list[float]]:
    """Flow-matching fit of the real score model on fresh S-shape samples each step."""
    torch.manual_seed(cfg.seed)
    net = build_toy_net(cfg.real_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.real_lr, weight_decay=0.0)
    fm = FlowMatchingLoss()
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    it = range(cfg.real_steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="real score model", leave=False, mininterval=2.0)
    for step in it:
        x = as_token(sample_sshape(cfg.real_batch, seed=cfg.seed * 100_003 + step + 1))
        y = torch.zeros(x.shape[0], dtype=torch.long)
        loss, _ = fm(net, x, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net.eval(), losses


def measure(points: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from dmvae_study.metrics import energy_distance, sliced_wasserstein
    nn_d, pair = spread(points)
    return {"energy": float(energy_distance(points, ref)), "swd": float(sliced_wasserstein(points, ref, seed=0)),
            "coverage": coverage(points), "nn_dist": nn_d, "pair_dist": pair}


def run_objective(cfg: ToyConfig, objective: str, real: torch.nn.Module,
                  report: Callable[[dict], None] | None = None) -> tuple[torch.Tensor, dict[str, float], list[dict]]:
    """Move the points with one objective; returns (final points (n, 2), summary, history)."""
    from dmvae_study.objectives.dm import OBJECTIVES, fake_score_loss
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    loss_fn = OBJECTIVES[objective]
    torch.manual_seed(cfg.seed)
    points = torch.nn.Parameter(torch.rand(cfg.num_points, 2) * 3.0 - 1.5)
    real = real.eval().requires_grad_(False)
    fake = copy.deepcopy(real).train().requires_grad_(True)  # initialised from the real model (Sec. 3.2)
    opt_p = torch.optim.Adam([points], lr=cfg.lr_points)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.lr_fake, weight_decay=0.0)
    ref = sample_sshape(cfg.eval_samples, seed=cfg.seed + 777)
    y = torch.zeros(cfg.num_points, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history, reached = [], None
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for step in range(cfg.steps):
        if step % cfg.points_every == 0:
            lo, hi = annealed_t_range(step / max(cfg.steps - 1, 1), cfg.t_min, cfg.t_max, 0.5) \
                if cfg.anneal else (cfg.t_min, cfg.t_max)
            t = sample_t(cfg.num_points, t_min=lo, t_max=hi, generator=g)
            eps = torch.randn(cfg.num_points, 2, 1, 1, generator=g)
            loss = loss_fn(as_token(points), real, fake, y, t, eps)
            opt_p.zero_grad(set_to_none=True)
            fake.zero_grad(set_to_none=True)
            loss.backward()
            opt_p.step()
        loss_f = fake_score_loss(fake, as_token(points.detach()), y, generator=g)
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        opt_f.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = {"step": step + 1, **measure(points.detach(), ref)}
            if not math.isfinite(m["energy"]):
                m["energy"] = float("inf")
            if reached is None and m["energy"] <= cfg.threshold:
                reached = step + 1
            history.append(m)
            if report is not None:
                report(m)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    final = history[-1]
    summary = {**{k: v for k, v in final.items() if k != "step"},
               "steps_to_threshold": float(reached) if reached is not None else float("nan"),
               "wall_s_per_1k_steps": wall / cfg.steps * 1000, "peak_rss_mib": rss / 1024,
               "rss_growth_mib": (rss - rss0) / 1024}
    return points.detach(), summary, history


def gradient_field(objective: str, real: torch.nn.Module, fake: torch.nn.Module, points: torch.Tensor,
                   t_value: float, seed: int = 0, repeats: int = 8) -> torch.Tensor:
    """Negative gradient `(n, 2)` of an objective w.r.t. the points at a forced t (App. B),
    averaged over `repeats` noise draws."""
    from dmvae_study.objectives.dm import OBJECTIVES
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(points)
    y = torch.zeros(points.shape[0], dtype=torch.long)
    for _ in range(repeats):
        x = points.clone().requires_grad_(True)
        t = torch.full((points.shape[0],), t_value)
        eps = torch.randn(points.shape[0], 2, 1, 1, generator=g)
        loss = OBJECTIVES[objective](as_token(x), real, fake, y, t, eps)
        (gx,) = torch.autograd.grad(loss, x)
        total -= gx
    return total / repeats
