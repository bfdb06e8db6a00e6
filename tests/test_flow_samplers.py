"""Flow-matching conventions and samplers against closed forms for Gaussian data N(mu, sigma^2 I),
plus the acceptance test: a tiny LightningDiT fit by flow matching reproduces a 2D mixture's weights."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dmvae_study.configlib import ConfigError
from dmvae_study.models.lightningdit import build_lightningdit
from dmvae_study.objectives.flow import (FlowMatchingLoss, gaussian_score, gaussian_velocity, sample_t,
                                         score_to_velocity, shift_time, velocity_to_denoised, velocity_to_score)
from dmvae_study.samplers import Sampler, guided, ode_time_grid, sample_ode, sample_sde, sde_time_grid

torch.set_num_threads(1)
MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
SIGMA = 0.8


def exact_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return gaussian_velocity(x, t, MU.to(x.dtype), SIGMA)


def var_t(t: torch.Tensor) -> torch.Tensor:
    """Per-dim variance of x_t = t x + (1-t) eps for x ~ N(mu, sigma^2 I)."""
    return t**2 * SIGMA**2 + (1 - t) ** 2


# ---- conversions against independent derivations ------------------------------------------------

def test_score_from_velocity_matches_autograd_log_density():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = torch.randn(64, 4, generator=g, dtype=torch.float64) * 2
    s = velocity_to_score(exact_v(x_t, t), x_t, t)
    assert torch.allclose(s, gaussian_score(x_t, t, MU, SIGMA), rtol=1e-10, atol=1e-10)
    # independent: grad of log N(x_t; t mu, var_t I)
    x = x_t.clone().requires_grad_(True)
    logp = -0.5 * ((x - t[:, None] * MU) ** 2 / var_t(t)[:, None]).sum()
    (s_ref,) = torch.autograd.grad(logp, x)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(score_to_velocity(s, x_t, t), exact_v(x_t, t), rtol=1e-10, atol=1e-10)


def test_denoised_is_posterior_mean():
    """D(x_t) = E[x | x_t] = mu + t sigma^2 / var_t (x_t - t mu) (Gaussian conditioning)."""
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, generator=g, dtype=torch.float64)
    x_t = torch.randn(32, 4, generator=g, dtype=torch.float64)
    ref = MU + (t * SIGMA**2 / var_t(t))[:, None] * (x_t - t[:, None] * MU)
    assert torch.allclose(velocity_to_denoised(exact_v(x_t, t), x_t, t), ref, rtol=1e-10, atol=1e-10)


def test_sample_t_ranges_and_shift():
    g = torch.Generator().manual_seed(2)
    for kind in ("uniform", "logit_normal"):
        t = sample_t(20000, kind=kind, t_min=0.2, t_max=0.6, shift=2.0, generator=g)
        assert t.min() >= 0.2 and t.max() <= 0.6 and t.shape == (20000,)
    assert abs(sample_t(20000, generator=g).mean() - 0.5) < 0.01
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 2.5, 4.0):
        st = shift_time(u, s)
        assert st[0] == 0 and st[-1] == 1 and (st.diff() > 0).all()
        # the official DMVAE formula (transport.py / integrators.py), t = 1 data
        assert torch.allclose(st, 1 - s * (1 - u) / (1 + (s - 1) * (1 - u)))
    assert (shift_time(u[1:-1], 3.0) < shift_time(u[1:-1], 1.5)).all()  # larger shift: closer to noise
    assert torch.equal(ode_time_grid(10, 3.0), shift_time(torch.linspace(0, 1, 11, dtype=torch.float64), 3.0))
    assert torch.allclose(sde_time_grid(250), torch.linspace(0, 0.96, 250, dtype=torch.float64))  # official grid
    with pytest.raises(ValueError):
        sample_t(4, t_min=0.7, t_max=0.3)


def test_flow_matching_loss_irreducible_value():
    """At the exact velocity, E||v - u||^2 per dim at time t is Var(x - eps | x_t) = sigma^2 / var_t(t)."""
    g = torch.Generator().manual_seed(3)
    n, loss = 50000, FlowMatchingLoss()
    x = MU + SIGMA * torch.randn(n, 4, generator=g, dtype=torch.float64)
    net = lambda x_t, t, y: exact_v(x_t, t)  # noqa: E731
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((n,), tv, dtype=torch.float64)
        eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
        val, _ = loss(net, x, t=t, eps=eps)
        ref = SIGMA**2 / var_t(torch.tensor(tv))
        assert abs(val - ref) < 0.02 * ref  # MC relative std ~ sqrt(2 / (4n)) = 0.3%
        worse, _ = loss(lambda x_t, t, y: exact_v(x_t, t) + 0.1, x, t=t, eps=eps)
        assert worse > val


# ---- samplers driven by the exact Gaussian velocity ---------------------------------------------

def check_moments(x: torch.Tensor) -> None:
    """Mean within 4 std errors (sigma/sqrt(n)) per dim; variance within 2% pooled, 5% per dim."""
    n = x.shape[0]
    assert ((x.mean(0) - MU).abs() < 4 * SIGMA / math.sqrt(n)).all(), x.mean(0)
    var = x.var(0)
    assert abs(var.mean() / SIGMA**2 - 1) < 0.02, var
    assert ((var / SIGMA**2 - 1).abs() < 0.05).all(), var


@pytest.mark.parametrize("method,steps,shift,tol", [("euler", 250, 1.0, 0.025), ("euler", 250, 3.0, 0.04),
                                                    ("heun", 20, 1.0, 1e-3), ("heun", 40, 3.0, 5e-3)])
def test_ode_maps_noise_to_gaussian(method, steps, shift, tol):
    """The exact flow map of this isotropic Gaussian path is eps -> mu + sigma eps (x_t stays
    t mu + sqrt(var_t) eps along the ODE); check it per sample (discretisation error only: Euler is
    first order, its variance is ~1% low at 250 steps), then the moments."""
    eps = torch.randn(10000, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = sample_ode(exact_v, eps, steps, method=method, shift=shift)
    assert (x - (MU + SIGMA * eps)).abs().max() < tol
    check_moments(x)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_sde_maps_noise_to_gaussian(shift):
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(10000, 4, generator=g, dtype=torch.float64)
    check_moments(sample_sde(exact_v, eps, 250, shift=shift, generator=g))


def test_sde_is_stochastic_and_seeded():
    eps = torch.randn(8, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = sample_sde(exact_v, eps, 20, generator=torch.Generator().manual_seed(0))
    b = sample_sde(exact_v, eps, 20, generator=torch.Generator().manual_seed(0))
    c = sample_sde(exact_v, eps, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()
    assert torch.isfinite(sample_sde(exact_v, eps, 20, last_step_size=0.0)).all()  # runs to t = 1 exactly


# ---- guidance and the config wrapper ------------------------------------------------------------

def small_dit(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_lightningdit("tiny", in_channels=2, input_size=1, num_classes=num_classes)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_guided_interval():
    m, y = small_dit(), torch.tensor([0, 1, 2, 0])
    x, t = torch.randn(4, 2), torch.tensor([0.1, 0.4, 0.6, 0.9])
    v_cond, v_null = m(x, t, y), m(x, t, None)
    v = guided(m, y, 4.0, interval=(0.3, 0.7))(x, t)
    inside = torch.tensor([False, True, True, False])[:, None]
    assert torch.allclose(v, torch.where(inside, v_null + 4.0 * (v_cond - v_null), v_cond), atol=1e-5)
    assert torch.allclose(guided(m, y)(x, t), v_cond, atol=1e-6)
    with pytest.raises(ValueError):
        guided(m, y, 2.0, interval=(0.8, 0.2))


def test_sampler_config():
    m = small_dit()
    noise, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    for kind in ("ode_euler", "ode_heun", "sde"):
        s = Sampler.from_dict({"kind": kind, "steps": 4, "cfg_scale": 2, "cfg_interval": [0.2, 1.0]})
        out = s(m, noise, y, generator=torch.Generator().manual_seed(0))
        assert out.shape == noise.shape and torch.isfinite(out).all()
    assert Sampler().kind == "sde" and Sampler().steps == 250
    with pytest.raises(ConfigError, match="unknown config key stepz"):
        Sampler.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="cfg_scale"):
        Sampler(cfg_scale=0.5)


# ---- acceptance: learn a 2D mixture with a tiny LightningDiT on one token --------------------------

CENTERS = torch.tensor([[-1.5, -1.0], [1.5, 1.0]])
WEIGHTS = torch.tensor([0.7, 0.3])


def mixture(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return CENTERS[k] + 0.15 * torch.randn(n, 2, generator=g)


@pytest.mark.slow
def test_tiny_dit_learns_mixture_weights():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = build_lightningdit("tiny", in_channels=2, input_size=1, num_classes=1, class_dropout=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    steps, fm = 400, FlowMatchingLoss()
    # linear lr decay: without it the last noisy updates move the mode split by several points (seed to seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        loss, _ = fm(net, mixture(256, g), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    out = sample_ode(net, torch.randn(4000, 2, generator=g), 50)  # (B, 2) points in token-input mode
    nearest = torch.cdist(out, CENTERS).argmin(1)
    frac = torch.bincount(nearest, minlength=2).float() / len(out)
    print(f"final loss {loss.item():.3f}; sampled weights {frac.tolist()} (target {WEIGHTS.tolist()})")
    assert (frac - WEIGHTS).abs().max() < 0.05
    assert (torch.cdist(out, CENTERS).min(1).values < 0.6).float().mean() > 0.9  # samples land on the modes


# ---- reference: the official SiT/DMVAE transport sampler (when the repo is available) -------------

OFFICIAL = Path(os.environ.get("DMVAE_OFFICIAL_REPO", "/work/.mirror/sen-ye+dmvae/repo"))


@pytest.mark.skipif(not OFFICIAL.exists(), reason="official sen-ye/dmvae repo not available (DMVAE_OFFICIAL_REPO)")
def test_sde_matches_official_sampler(tmp_path, monkeypatch):
    """`sample_50k.py`'s SDE (Euler, diffusion 'sigma', last step 'Mean' 0.04, 250 steps) on the exact
    Gaussian velocity, with the same global-RNG noise draws: same samples up to float32 rounding."""
    pkg = tmp_path / "official_transport"
    pkg.mkdir()
    for f in ("__init__.py", "transport.py", "path.py", "integrators.py", "utils.py"):
        src = subprocess.run(["git", "-C", str(OFFICIAL), "show", f"HEAD:diffusion/transport/{f}"],
                             capture_output=True, text=True, check=True).stdout
        (pkg / f).write_text(src)
    stub = types.ModuleType("torchdiffeq")
    stub.odeint = None  # the ODE path is not exercised
    monkeypatch.setitem(sys.modules, "torchdiffeq", stub)
    monkeypatch.syspath_prepend(str(tmp_path))
    from official_transport import Sampler as OfficialSampler, create_transport
    sample = OfficialSampler(create_transport("Linear", "velocity", None, 0.0, 0.0)).sample_sde(
        sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
        last_step_size=0.04, num_steps=250)
    v = lambda x, t: gaussian_velocity(x, t, MU.float(), SIGMA)  # noqa: E731
    init = torch.randn(512, 4, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    ref = sample(init, v)[-1]
    torch.manual_seed(0)
    ours = sample_sde(v, init, 250)  # generator=None: the same global-RNG draws, in the same order
    assert (ours - ref).abs().max() < 1e-4
