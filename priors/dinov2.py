"""SSL features: DINOv2 patch tokens of the training images (paper Sec. 4, Category 1; Table 1 "DINO").

The paper's best prior. Backbone `prior.backbone` or DINOv2 ViT-L/14; the feature grid is the
tokenizer's latent grid (`priors.registry.latent_grid`: input resized to grid * patch pixels, patch
`tokenizer.backbone_patch or 14`), so the reference set is `(reduced_dim, h, w)`, one token per cell.
"""

from __future__ import annotations

import logging

from dmvae_study.config import ExperimentConfig
from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, training_items
from priors.registry import BuildContext, register

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "dinov2_vitl14"  # the paper's DINOv2-ViT/L


def dino_backbone(cfg: ExperimentConfig) -> str:
    """`prior.backbone` when set (the smoke preset: dinov2_vits14), else DINOv2 ViT-L/14."""
    name = cfg.prior.backbone or DEFAULT_BACKBONE
    if not name.startswith("dinov2"):
        log.warning("prior %s uses prior.backbone=%s, not a DINOv2 model: its features are %s features",
                    cfg.prior.name, name, name)
    return name


@register("dinov2", kind="data", order=10)
def build(ctx: BuildContext) -> ReferenceSet:
    """DINOv2 spatial tokens of every training image (or prior.num_samples of them), reduced."""
    return backbone_prior(ctx, dino_backbone(ctx.cfg), training_items(ctx))
