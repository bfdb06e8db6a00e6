"""PatchGAN discriminator, hinge losses and DiffAugment for the tokenizer's adversarial term
(paper Eq. 7/10, App. A.1; official `train_tokenizer.py`: PatchGAN + hinge + DiffAug + bCR).

- `NLayerDiscriminator`: the pix2pix / taming PatchGAN: 4x4 convs, stride 2 for the first
  `n_layers`, then two stride-1 convs; returns a logit map `(B, 1, h', w')`. The official uses
  SyncBatchNorm; convert with `nn.SyncBatchNorm.convert_sync_batchnorm` under DDP.
- `diff_augment`: DiffAugment (Zhao et al. 2020) on tensors, differentiable w.r.t. the images, so
  the generator's adversarial gradient passes through it. The official applies it with probability
  1 on every discriminator input (real and fake), translation 1/8 of the side, cutout 0.2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dmvae_study.models.decoder import group_norm

DiscNorm = Literal["batch", "group", "none"]


class NLayerDiscriminator(nn.Module):
    """`(B, in_channels, H, W)` -> patch logits `(B, 1, h', w')` (about H / 2**n_layers - 2 per side)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: DiscNorm = "batch",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")

        def norm_layer(c: int) -> nn.Module:
            return {"batch": lambda: nn.BatchNorm2d(c), "group": lambda: group_norm(c, 32),
                    "none": nn.Identity}[norm]()

        bias = norm == "none"  # a norm's affine shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


__all__ = ["NLayerDiscriminator"]
