"""Supervised features: torchvision ResNet-34 (ImageNet classifier) feature maps (paper Sec. 4,
Category 1; Table 1 "Resnet").

Default `prior.reduction=tokenizer`: a frozen-ResNet-34 tokenizer of the A.1 recipe and its latents.
Feature reductions use the last stage (`layer4`, 512 channels, stride 32) on images resized to
grid * 32 pixels, so its map lies on the tokenizer's latent grid (one token per latent cell).
Weights: the weights dir's `resnet34-b627a593.pth` (torchvision IMAGENET1K_V1).
"""

from __future__ import annotations

from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, backbone_tokenizer_needs, training_items
from priors.registry import REDUCTIONS, BuildContext, register


@register("resnet34", kind="data", order=20, reduction="tokenizer", reductions=REDUCTIONS,
          needs=backbone_tokenizer_needs(lambda cfg: "resnet34"))
def build(ctx: BuildContext) -> ReferenceSet:
    """ResNet-34 tokenizer latents (or reduced layer4 features) of the training images on the latent grid."""
    return backbone_prior(ctx, "resnet34", training_items(ctx), backbone_kw={"layer": "layer4"})
