"""Sub-sampled SSL features: DINOv2 tokens of images from 10 classes only (paper Sec. 4, Category 2;
Table 1 "SubDino"): a multi-modal distribution simpler than the full DINO prior.

The paper files it with the data-independent priors (it does not represent the full data
distribution), so it registers as kind "synthetic" (DM weight 1 by default, Sec. 4).
Classes: `prior.classes`, else `default_classes(data.num_classes)`:
- 1000 classes (ImageNet): the 10 Imagenette classes, `IMAGENETTE_IDS` (fast.ai's fixed subset);
- 10 classes or fewer (Fashion-MNIST): the first half, 0 .. num_classes // 2 - 1 (all 10 would be
  the full prior);
- otherwise 10 evenly spaced ids `round(k * num_classes / 10)`.
Labels keep their dataset class ids (num_classes unchanged). The reference is built exactly as the
dinov2 prior's (same tokenizer or reducer), restricted to those classes.
"""

from __future__ import annotations

from dmvae_study.config import ExperimentConfig
from dmvae_study.reference import ReferenceSet
from priors.dinov2 import dino_backbone, dino_stand_in
from priors.extract import backbone_prior, backbone_tokenizer_needs, training_items
from priors.registry import REDUCTIONS, BuildContext, register

# tench, English springer, cassette player, chain saw, church, French horn, garbage truck,
# gas pump, golf ball, parachute: standard ImageNet-1k indices (sorted synset order).
IMAGENETTE_IDS = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def default_classes(num_classes: int) -> tuple[int, ...]:
    if num_classes == 1000:
        return IMAGENETTE_IDS
    if num_classes <= 10:
        return tuple(range(max(1, num_classes // 2)))
    return tuple(sorted({round(k * num_classes / 10) for k in range(10)}))


def sub_classes(cfg: ExperimentConfig) -> tuple[int, ...]:
    classes = cfg.prior.classes if cfg.prior.classes is not None else default_classes(cfg.data.num_classes)
    bad = [c for c in classes if not 0 <= c < cfg.data.num_classes]
    if bad or not classes:
        raise ValueError(f"prior.classes={list(classes)}: need class ids in [0, {cfg.data.num_classes})"
                         f"{f', got {bad}' if bad else ''}")
    return tuple(int(c) for c in classes)


@register("sub_dino", kind="synthetic", order=50, reduction="tokenizer", reductions=REDUCTIONS,
          needs=backbone_tokenizer_needs(dino_backbone), stand_in=dino_stand_in)
def build(ctx: BuildContext) -> ReferenceSet:
    """The dinov2 prior's latents (same tokenizer) of the training images of 10 classes only."""
    classes = sub_classes(ctx.cfg)
    return backbone_prior(ctx, dino_backbone(ctx.cfg), training_items(ctx, classes), classes=list(classes))
