"""The DM objective (Eq. 9) and the Sec. 3.3 variants against closed forms.

References are independent of the code under test: for Gaussian data N(mu, sigma^2 I) on the path
x_t = t x + (1 - t) eps, x_t ~ N(t mu, a I) with a = t^2 sigma^2 + (1 - t)^2, so
    score s(x_t) = -(x_t - t mu) / a,   E[x | x_t] = mu + t sigma^2 / a (x_t - t mu),
    velocity v = E[x - eps | x_t] = mu + k (x_t - t mu),  k = (t sigma^2 - (1 - t)) / a  (dv/dx_t = k I),
and each variant's gradient w.r.t. x is derived by hand below (float64). The score nets are
closed-form modules (their mean a parameter, to check no gradient reaches it). The gradient-flow
test uses a tiny random-init tokenizer and tiny stand-in score nets on purpose (no pretrained weights).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmvae_study.models.autoencoder import Encoder, MLPProjector, SmallConvEncoder, Tokenizer
from dmvae_study.models.decoder import Decoder
from dmvae_study.models.heads import build_head
from dmvae_study.objectives.dm import OBJECTIVES, DistributionMatchingLoss, dm_gradient, fake_score_loss, guided_velocity
from dmvae_study.objectives.recon import reconstruction_loss

torch.set_num_threads(1)
D64 = torch.float64


class GaussNet(nn.Module):
    """Exact velocity of N(mu_y, sigma^2 I); `mu` has one row per class plus a null row (y=None)."""

    def __init__(self, mu: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu.clone().to(D64))
        self.sigma = sigma

    def mean_of(self, y: torch.Tensor | None, B: int) -> torch.Tensor:
        return self.mu[-1].expand(B, -1) if y is None else self.mu[y]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        mu, tt = self.mean_of(y, x_t.shape[0]), t[:, None]
        return mu + k_of(tt, self.sigma) * (x_t - tt * mu)


def a_of(t: torch.Tensor, s: float) -> torch.Tensor:
    return t**2 * s**2 + (1 - t) ** 2


def k_of(t: torch.Tensor, s: float) -> torch.Tensor:
    return (t * s**2 - (1 - t)) / a_of(t, s)


def score(x_t, t, mu, s):
    return -(x_t - t * mu) / a_of(t, s)


def posterior_mean(x_t, t, mu, s):
    return mu + t * s**2 / a_of(t, s) * (x_t - t * mu)


def setup(B: int = 16, d: int = 3, seed: int = 0, t_lo: float = 0.05, t_hi: float = 0.95):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=D64) * 1.5 + 0.3
    eps = torch.randn(B, d, generator=g, dtype=D64)
    t = torch.rand(B, generator=g, dtype=D64) * (t_hi - t_lo) + t_lo
    real = GaussNet(torch.tensor([[0.7, -0.4, 1.2]], dtype=D64), 0.6)
    fake = GaussNet(torch.tensor([[-0.5, 0.9, 0.1]], dtype=D64), 1.3)
    return x, eps, t, real, fake


def grad_of(loss_fn, x):
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    return x.grad, loss


# ---- (a) Eq. 9 direction and magnitude --------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_dm_descent_moves_along_score_difference(normalize):
    x, eps, t, real, fake = setup()
    dm = DistributionMatchingLoss(dm_weight=10.0, normalize=normalize)
    gx, _ = grad_of(lambda z: dm(z, real, fake, t=t, eps=eps)[0], x)
    tt = t[:, None]
    x_t = tt * x + (1 - tt) * eps
    mu_r, mu_f = real.mu[0].detach(), fake.mu[0].detach()
    ds = score(x_t, tt, mu_r, 0.6) - score(x_t, tt, mu_f, 1.3)
    cos = torch.nn.functional.cosine_similarity(-gx, ds, dim=1)
    assert (cos > 0.999).all(), cos
    # magnitude: dL/dx = dm_weight / numel * (D_fake - D_real) / w, w = mean |x - D_real| per sample
    d_r, d_f = posterior_mean(x_t, tt, mu_r, 0.6), posterior_mean(x_t, tt, mu_f, 1.3)
    w = (x - d_r).abs().mean(dim=1, keepdim=True) if normalize else torch.ones_like(tt)
    assert torch.allclose(gx, 10.0 / x.numel() * (d_f - d_r) / w, rtol=1e-9, atol=1e-12)
    assert real.mu.grad is None and fake.mu.grad is None


def test_dm_gradient_vanishes_when_fake_equals_real():
    x, eps, t, real, _ = setup()
    gx, loss = grad_of(lambda z: DistributionMatchingLoss()(z, real, real, t=t, eps=eps)[0], x)
    assert gx.abs().max() == 0 and loss == 0


def test_dm_stats_and_time_range():
    x, _, _, real, fake = setup(B=256)
    dm = DistributionMatchingLoss(t_min=0.2, t_max=0.4)
    loss, stats = dm(x.float(), real.float(), fake.float(), generator=torch.Generator().manual_seed(1))
    assert 0.2 <= stats["dm/t_mean"] <= 0.4 and stats["dm/grad_norm"] > 0 and torch.isfinite(loss)
    assert set(stats) == {"loss/dm", "dm/grad_norm", "dm/t_mean", "dm/w_mean"}


# ---- (b) CFG on both nets --------------------------------------------------------------------------

def test_dm_cfg_guides_both_nets_on_all_channels():
    x, eps, t, _, _ = setup(B=12)
    g = torch.Generator().manual_seed(3)
    real = GaussNet(torch.randn(4, 3, generator=g, dtype=D64), 0.7)   # 3 classes + null row
    fake = GaussNet(torch.randn(4, 3, generator=g, dtype=D64), 1.1)
    y = torch.arange(12) % 3
    scale = 3.0
    gx, _ = grad_of(lambda z: DistributionMatchingLoss(dm_weight=1.0, cfg_scale=scale)(z, real, fake, y, t=t, eps=eps)[0], x)
    tt = t[:, None]
    x_t = tt * x + (1 - tt) * eps

    def guided_clean(net, s):  # independent: guide the posterior means (D is affine in v)
        d_c = posterior_mean(x_t, tt, net.mu[y].detach(), s)
        d_n = posterior_mean(x_t, tt, net.mu[-1].detach().expand_as(x), s)
        return d_n + scale * (d_c - d_n)
    d_r, d_f = guided_clean(real, 0.7), guided_clean(fake, 1.1)
    w = (x - d_r).abs().mean(dim=1, keepdim=True)
    assert torch.allclose(gx, (d_f - d_r) / w / x.numel(), rtol=1e-9, atol=1e-12)
    gx1, _ = grad_of(lambda z: DistributionMatchingLoss(dm_weight=1.0)(z, real, fake, y, t=t, eps=eps)[0], x)
    assert not torch.allclose(gx, gx1)


def test_guided_velocity_prefers_forward_cfg():
    class WithCfg(nn.Module):
        calls: list = []

        def forward(self, x, t, y=None):
            raise AssertionError("forward_cfg should be used")

        def forward_cfg(self, x, t, y, cfg_scale):
            self.calls.append(cfg_scale)
            return torch.zeros_like(x)
    net = WithCfg()
    guided_velocity(net, torch.zeros(2, 3), torch.ones(2) * 0.5, torch.zeros(2, dtype=torch.long), 4.0)
    assert net.calls == [4.0]


# ---- (c) nan safety ---------------------------------------------------------------------------------

def test_dm_nan_rows_do_not_poison_others():
    x, eps, t, real, fake = setup(B=8)
    bad = x.clone()
    bad[0] = float("nan")
    bad[1, 1] = float("inf")
    dm = DistributionMatchingLoss()
    g_bad, _ = grad_of(lambda z: dm(z, real, fake, t=t, eps=eps)[0], bad)
    g_ok, _ = grad_of(lambda z: dm(z, real, fake, t=t, eps=eps)[0], x)
    assert torch.isfinite(g_bad[2:]).all()
    assert torch.allclose(g_bad[2:], g_ok[2:])


def test_dm_zero_weight_and_nonfinite_net_output_are_safe():
    x, eps, t, real, fake = setup(B=6)
    t = t.clone()
    t[0] = 1.0                        # x_t = x = D_real: w = 0 (and p_fake = 0): g must be 0, not nan
    g = dm_gradient(x, t[:, None] * x + (1 - t[:, None]) * eps, t, real(x, t), fake(x, t))
    assert torch.isfinite(g).all()

    def broken_fake(x_t, tt, y=None):
        v = fake(x_t, tt, y)
        return torch.cat([torch.full_like(v[:1], float("nan")), v[1:]])
    gx, _ = grad_of(lambda z: DistributionMatchingLoss()(z, real, broken_fake, t=t, eps=eps)[0], x)
    assert torch.isfinite(gx).all() and gx[0].abs().max() == 0 and gx[1:].abs().max() > 0


# ---- (d) every Sec. 3.3 variant against its hand-derived gradient ----------------------------------

def expected_grads(x, eps, t, real, fake) -> dict[str, torch.Tensor]:
    N = x.numel()
    tt = t[:, None]
    x_t = tt * x + (1 - tt) * eps
    u = x - eps
    mu_r, s_r, mu_f, s_f = real.mu[0].detach(), real.sigma, fake.mu[0].detach(), fake.sigma
    k_r, k_f = k_of(tt, s_r), k_of(tt, s_f)
    v_r, v_f = mu_r + k_r * (x_t - tt * mu_r), mu_f + k_f * (x_t - tt * mu_f)
    d_r, d_f = posterior_mean(x_t, tt, mu_r, s_r), posterior_mean(x_t, tt, mu_f, s_f)
    w = (x - d_r).abs().mean(dim=1, keepdim=True)
    out = {
        "dm": (d_f - d_r) / N,
        "dm_normalized": (d_f - d_r) / w / N,
        "score_diff_1": 2 / N * (v_f - v_r) * k_f * tt,
        "score_diff_2": 2 / N * (v_r - v_f) * k_r * tt,
        "score_diff_3": 2 / N * (v_r - v_f) * (k_r - k_f) * tt,
        "loss_diff": ((v_r - u) * k_r - (v_f - u) * k_f) * tt / N,
        "real_score_push": -score(x_t, tt, mu_r, s_r) / N,
        "fake_score_push": -score(x_t, tt, mu_f, s_f) / N,
        "fake_score_repel": score(x_t, tt, mu_f, s_f) / N,
    }
    out["score_diff"] = out["score_diff_3"]
    for name, v, k in (("real", v_r, k_r), ("fake", v_f, k_f)):
        out[f"{name}_score_1"] = (v - u) * k * tt / N        # through the net input only
        out[f"{name}_score_2"] = (u - v) / N                 # through the target only
        out[f"{name}_score_3"] = (v - u) * (k * tt - 1) / N  # both
    return out


def test_every_registered_objective_has_a_reference():
    x, eps, t, real, fake = setup(B=2)
    assert set(OBJECTIVES) == set(expected_grads(x, eps, t, real, fake))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_gradient_matches_closed_form(name):
    x, eps, t, real, fake = setup()
    gx, loss = grad_of(lambda z: OBJECTIVES[name](z, real, fake, None, t, eps), x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    ref = expected_grads(x, eps, t, real, fake)[name]
    assert torch.allclose(gx, ref, rtol=1e-8, atol=1e-12), (gx - ref).abs().max()
    # the score nets' parameters stay out of the graph, and keep requires_grad
    assert real.mu.grad is None and fake.mu.grad is None
    assert real.mu.requires_grad and fake.mu.requires_grad


def test_fake_score_loss_trains_only_the_fake_net():
    x, eps, t, _, fake = setup()
    x = x.clone().requires_grad_(True)
    loss = fake_score_loss(fake, x, None, t=t, eps=eps)
    loss.backward()
    tt = t[:, None]
    v = fake(tt * x.detach() + (1 - tt) * eps, t)
    assert torch.allclose(loss.double(), ((v - (x.detach() - eps)) ** 2).mean(), rtol=1e-6)  # fm reduces in fp32
    assert x.grad is None and fake.mu.grad is not None and fake.mu.grad.abs().sum() > 0


# ---- (e) gradient flow of the DMVAE objective (Sec. 3.1, Fig. 2) -----------------------------------

class TinyVelocityNet(nn.Module):
    """Stand-in score net `(x_t, t, y) -> v` on (B, C, h, w): two 3x3 convs with a time channel."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c + 1, 16, 3, padding=1), nn.Conv2d(16, c, 3, padding=1)

    def forward(self, x, t, y=None):
        tc = t.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]).to(x.dtype)
        return self.c2(torch.nn.functional.silu(self.c1(torch.cat([x, tc], 1))))


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def nonzero(gs) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in gs)


def test_dmvae_gradient_flow():
    torch.manual_seed(0)
    enc = Encoder(SmallConvEncoder(width=8, stride=4), MLPProjector(32, 16, 4), freeze_backbone=False)
    tok = Tokenizer(enc, Decoder(4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attention=False), "ae", 4)
    head = build_head((4, 4, 4), (6, 4, 4))            # spatially aligned, 4 -> 6 channels: the MLP head
    real, fake = TinyVelocityNet(6).eval().requires_grad_(False), TinyVelocityNet(6)
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    dm = DistributionMatchingLoss(dm_weight=10.0)

    def losses():
        rec, z, _ = tok(img)
        l_rec, _ = reconstruction_loss(img, rec, None)
        l_dm, _ = dm(head(tok.normalize(z)), real, fake, generator=torch.Generator().manual_seed(0))
        return l_rec, l_dm

    parts = {"decoder": tok.decoder, "encoder": tok.encoder, "head": head, "fake": fake}
    l_rec, l_dm = losses()
    l_dm.backward()
    after_dm = {k: grads_of(m) for k, m in parts.items()}
    for m in (tok, head, fake):
        m.zero_grad(set_to_none=True)
    l_rec, l_dm = losses()
    l_rec.backward()
    after_rec = {k: grads_of(m) for k, m in parts.items()}

    assert not nonzero(after_dm["decoder"]) and nonzero(after_rec["decoder"])   # decoder: L_rec only
    assert nonzero(after_dm["head"]) and not nonzero(after_rec["head"])         # head: L_DM only
    assert nonzero(after_dm["encoder"]) and nonzero(after_rec["encoder"])       # encoder: both
    assert not nonzero(after_dm["fake"]) and not nonzero(after_rec["fake"])     # fake net: neither
    for m in (tok, head, fake):
        m.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, z, _ = tok(img)
    fake_score_loss(fake, head(tok.normalize(z)), None).backward()           # Eq. 8 trains the fake net
    assert nonzero(grads_of(fake)) and not nonzero(grads_of(tok)) and not nonzero(grads_of(head))
