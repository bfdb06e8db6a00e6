"""Standard Gaussian N(0, I) in the latent shape (paper Sec. 4, Category 2; Table 1 "Gaussian"),
the prior of classic VAEs. Samples `(reduced_dim, h, w)` with `(h, w) = latent_grid(cfg)`; no labels.
"""

from __future__ import annotations

import torch

from dmvae_study.reference import ReferenceSet
from priors.registry import REDUCTIONS, BuildContext, latent_grid, register, sample_count


@register("gaussian", kind="synthetic", order=70, reduction="none", reductions=REDUCTIONS)  # drawn at reduced_dim
def build(ctx: BuildContext) -> ReferenceSet:
    """Standard normal samples in the latent shape, unlabelled."""
    cfg = ctx.cfg
    shape = (cfg.prior.reduced_dim, *latent_grid(cfg))
    n = sample_count(cfg)
    x = torch.randn((n, *shape), generator=ctx.generator("samples"))
    return ReferenceSet.standardised(x, None, num_classes=0,
                                     provenance={"distribution": "N(0, I)", "dim": x[0].numel()})
