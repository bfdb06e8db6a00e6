"""A prior defined in one module, as a user adds one: samples on a circle in every token's first two
channels (tests/test_stage_table.py imports it and runs the smoke pipeline; no other file names it)."""

import math

import torch

from dmvae_study.reference import ReferenceSet
from priors.registry import REDUCTIONS, BuildContext, latent_grid, register, sample_count


@register("ring_fixture", kind="synthetic", order=999, reduction="none", reductions=REDUCTIONS,
          stand_in=lambda cfg: "a test fixture")
def build(ctx: BuildContext) -> ReferenceSet:
    """Points on the unit circle (angle uniform) in channels 0-1 of each token, noise elsewhere."""
    cfg = ctx.cfg
    shape = (cfg.prior.reduced_dim, *latent_grid(cfg))
    n = sample_count(cfg)
    g = ctx.generator("samples")
    x = 0.1 * torch.randn((n, *shape), generator=g)
    angle = 2 * math.pi * torch.rand((n, *shape[1:]), generator=g)
    x[:, 0], x[:, 1] = torch.cos(angle), torch.sin(angle)
    return ReferenceSet.standardised(x, None, num_classes=0, provenance={"distribution": "ring"})
