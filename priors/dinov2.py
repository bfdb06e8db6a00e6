"""SSL features: DINOv2 patch tokens of the training images (paper Sec. 4, Category 1; Table 1 "DINO").

The paper's best prior. Backbone `prior.backbone` or DINOv2 ViT-L/14. By default (`prior.reduction=
tokenizer`, App. A.2) the reference set is the latents of the DINOv2 tokenizer's frozen encoder +
projector on the training images (with flips): at `imagenet256` that is the very tokenizer DMD trains,
so DMD starts at the reference. `feature_ae` / `pca` instead reduce the DINOv2 tokens on the
tokenizer's latent grid (input resized to grid * patch pixels, patch `tokenizer.backbone_patch or 14`).
"""

from __future__ import annotations

import logging

from dmvae_study.config import ExperimentConfig
from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, backbone_tokenizer_needs, training_items
from priors.registry import REDUCTIONS, BuildContext, register

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "dinov2_vitl14"  # the paper's DINOv2-ViT/L


def dino_backbone(cfg: ExperimentConfig) -> str:
    """`prior.backbone` when set (the smoke preset: dinov2_vits14), else DINOv2 ViT-L/14."""
    return cfg.prior.backbone or DEFAULT_BACKBONE


def dino_stand_in(cfg: ExperimentConfig) -> str | None:
    name = dino_backbone(cfg)
    return None if name.startswith("dinov2") else f"{name} in DINOv2's place"


@register("dinov2", kind="data", order=10, reduction="tokenizer", reductions=REDUCTIONS,
          needs=backbone_tokenizer_needs(dino_backbone), stand_in=dino_stand_in)
def build(ctx: BuildContext) -> ReferenceSet:
    """DINOv2 tokenizer latents (or reduced DINOv2 tokens) of every training image (or prior.num_samples)."""
    name = dino_backbone(ctx.cfg)
    if not name.startswith("dinov2") and ctx.is_main:
        log.warning("prior %s uses prior.backbone=%s, not a DINOv2 model: its features are %s features (the row "
                    "is labelled with what stands in for DINOv2)", ctx.cfg.prior.name, name, name)
    return backbone_prior(ctx, dino_backbone(ctx.cfg), training_items(ctx))
