"""Supervised features: torchvision ResNet-34 (ImageNet classifier) feature maps (paper Sec. 4,
Category 1; Table 1 "Resnet").

The last stage (`layer4`, 512 channels, stride 32) is run on images resized to grid * 32 pixels,
so its map lies on the tokenizer's latent grid (spatially aligned, one token per latent cell).
Weights: the weights dir's `resnet34-b627a593.pth` (torchvision IMAGENET1K_V1).
"""

from __future__ import annotations

from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, training_items
from priors.registry import BuildContext, register


@register("resnet34", kind="data", order=20)
def build(ctx: BuildContext) -> ReferenceSet:
    """ResNet-34 layer4 features of the training images on the latent grid, reduced."""
    return backbone_prior(ctx, "resnet34", training_items(ctx), backbone_kw={"layer": "layer4"})
