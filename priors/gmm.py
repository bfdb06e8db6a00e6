"""A 10-component Gaussian mixture in the latent shape (paper Sec. 4, Category 2; Table 1 "GMM"):
a simple multi-modal synthetic prior.

Construction, over the flattened latent `d = reduced_dim * h * w` (`(h, w) = latent_grid(cfg)`):
- K = `prior.gmm_components` equal weights 1/K;
- means `m_k = a * u_k`, `u_k` = normalised standard-normal vectors (random unit directions) from
  the seeded stream "means", with `a = sqrt((1 - s^2) d)` so every coordinate has variance ~1 overall;
- isotropic component std `s = GMM_STD = 0.5` (means are sqrt(1.5 d) apart, 2.4x the spread s sqrt(d)).
A sample draws `k ~ U{0..K-1}` and `x = m_k + s * eps`; its label is `k` (num_classes = K).
The means are saved as `gmm-means.pt` `(K, reduced_dim, h, w)` next to the reference set.
"""

from __future__ import annotations

import math

import torch

from dmvae_study.reference import ReferenceSet
from dmvae_study.store import save_torch
from priors.registry import REDUCTIONS, BuildContext, latent_grid, register, sample_count

GMM_STD = 0.5


def gmm_parameters(ctx: BuildContext) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Means `(K, reduced_dim, h, w)`, component std `s`, weights `(K,)` of the construction above."""
    cfg = ctx.cfg
    shape = (cfg.prior.reduced_dim, *latent_grid(cfg))
    k, d = cfg.prior.gmm_components, math.prod(shape)
    u = torch.randn((k, d), generator=ctx.generator("means"), dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    means = math.sqrt((1 - GMM_STD**2) * d) * u
    return means.float().reshape(k, *shape), GMM_STD, torch.full((k,), 1.0 / k)


@register("gmm", kind="synthetic", order=60, reduction="none", reductions=REDUCTIONS)  # drawn at reduced_dim
def build(ctx: BuildContext) -> ReferenceSet:
    """Samples of a K-component isotropic Gaussian mixture in the latent shape; label = component."""
    means, s, weights = gmm_parameters(ctx)
    n = sample_count(ctx.cfg)
    g = ctx.generator("samples")
    y = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[y] + s * torch.randn((n, *means.shape[1:]), generator=g)
    if ctx.is_main:
        save_torch(ctx.art.file("gmm-means.pt"), {"means": means, "std": torch.tensor(s), "weights": weights})
    return ReferenceSet.standardised(x, y, num_classes=len(weights), provenance={
        "distribution": f"GMM K={len(weights)}, means a*u_k, |m_k|=sqrt((1-s^2)d), std s={s}, equal weights",
        "gmm_components": len(weights), "gmm_std": s, "dim": int(means[0].numel()), "means_file": "gmm-means.pt"})
