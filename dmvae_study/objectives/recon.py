"""Reconstruction objective of the tokenizer (paper Eq. 7 / Eq. 10, App. A.1; official `train_tokenizer.py`):

    L_rec = l1 |x - x_rec| + l2 (x - x_rec)^2 + lpips_weight LPIPS(x, x_rec)
            + disc_weight * w_adapt * (-D(aug(x_rec)))                 once step >= disc_start

with `w_adapt = ||grad_last L_rec|| / (||grad_last L_gan|| + 1e-6)` clamped to [0, 1e4] at the decoder's
last conv (Esser et al. 2021), hinge discriminator with DiffAugment on both inputs and bCR, and the
beta-VAE baseline's KL term.

LPIPS is built only on request (`build_lpips`), never at import. Its VGG / AlexNet trunk needs
torchvision ImageNet weights, which are not downloadable offline: `build_lpips` looks them up in the
weights dir (`dmvae_study.weights`, names `vgg16` / `alexnet`) and fails naming the file; tests pass
`pnet_rand=True` for a random trunk (the calibrated linear heads ship inside the lpips wheel).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dmvae_study.objectives.gan import bcr_loss, diff_augment, hinge_d_loss, hinge_g_loss
from dmvae_study.objectives.gradients import frozen, grad_norm_ratio


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) for `(B, ...)` posteriors.

    "sum": summed over the non-batch dims, averaged over the batch (LDM's `posterior.kl()`, the
    scale its `kl_weight=1e-6` refers to; LDM also sums its reconstruction term per sample, so with
    the mean-reduced `reconstruction_loss` here the LDM balance is `kl_weight / (3 H W)`).
    "mean": averaged over all elements."""
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.reshape(kl.shape[0], -1).sum(dim=1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; choose 'sum' or 'mean'")


def build_lpips(net: Literal["vgg", "alex"] = "vgg", weights_dir: str | os.PathLike | None = None,
                pnet_rand: bool = False) -> nn.Module:
    """Frozen `lpips.LPIPS` in eval mode; inputs in [-1, 1]. `pnet_rand=True`: random trunk (tests only:
    the distance is then not perceptual). Otherwise the torchvision trunk weights must be in the weights
    dir; they are linked into torch.hub's cache so lpips loads them without network."""
    import lpips

    if not pnet_rand:
        from dmvae_study.weights import link_into_torch_hub
        link_into_torch_hub({"vgg": "vgg16", "alex": "alexnet"}[net], weights_dir)  # raises MissingWeightsError
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=pnet_rand, verbose=False)
    return module.eval().requires_grad_(False)


def reconstruction_loss(img: torch.Tensor, rec: torch.Tensor, lpips_module: nn.Module | None = None,
                        l1_weight: float = 1.0, l2_weight: float = 0.0, lpips_weight: float = 1.0
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel + perceptual terms of Eq. 10 on `img, rec (B, 3, H, W)` in [-1, 1]; returns (loss, stats).
    The perceptual term is off when `lpips_module` is None or `lpips_weight` is 0."""
    rec, img = rec.float(), img.float()
    l1, l2 = (rec - img).abs().mean(), ((rec - img) ** 2).mean()
    loss = l1_weight * l1 + l2_weight * l2
    stats = {"loss/l1": l1.detach(), "loss/l2": l2.detach()}
    if lpips_module is not None and lpips_weight > 0:
        p = lpips_module(img, rec).mean()
        loss = loss + lpips_weight * p
        stats["loss/lpips"] = p.detach()
    stats["loss/rec"] = loss.detach()
    return loss, stats


@dataclass
class ReconstructionLoss:
    """Eq. 10 with the official tokenizer's GAN recipe. `generator_loss` (also `__call__`) trains the
    tokenizer, `discriminator_loss` the PatchGAN. Scalars out; stats are detached tensors."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    lpips_weight: float = 1.0
    disc_weight: float = 0.5          # lambda of Eq. 10 (App. A.1)
    disc_start: int | None = 5000     # GAN term off before this step (App. A.1); None: never
    diffaug: str = "color,translation,cutout"  # DiffAugment policy on every D input ("" = off)
    cutout_ratio: float = 0.2
    bcr_weight: float = 1.0           # official `--bcr 1.0`; 0 disables
    max_adaptive_weight: float = 1e4
    lpips_module: nn.Module | None = field(default=None, repr=False)

    def gan_active(self, step: int) -> bool:
        return self.disc_weight > 0 and self.disc_start is not None and step >= self.disc_start

    def generator_loss(self, img: torch.Tensor, rec: torch.Tensor, step: int, disc: nn.Module | None = None,
                       last_layer: torch.Tensor | None = None, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tokenizer loss on `img, rec (B, 3, H, W)`. `last_layer`: the decoder's last weight
        (`Tokenizer.last_layer`), needed once the GAN term is on. The discriminator runs in eval mode
        with its parameters out of the graph (as the official's `requires_grad(disc, False)`)."""
        loss, stats = reconstruction_loss(img, rec, self.lpips_module, self.l1_weight, self.l2_weight, self.lpips_weight)
        d_weight = torch.zeros((), device=loss.device)
        if disc is not None and self.gan_active(step):
            if last_layer is None:
                raise ValueError("the adaptive GAN weight needs the decoder's last layer (last_layer=tok.last_layer)")
            was_training = disc.training
            disc.eval()
            try:
                with frozen(disc):
                    g_loss = hinge_g_loss(disc(self._aug(rec, generator)).float())
            finally:
                disc.train(was_training)
            d_weight = self.disc_weight * grad_norm_ratio(loss, g_loss, last_layer, eps=1e-6,
                                                          max_value=self.max_adaptive_weight)
            loss = loss + d_weight * g_loss
            stats["loss/gan_g"] = g_loss.detach()
        stats["gan/d_weight"] = d_weight.detach()
        return loss, stats

    __call__ = generator_loss

    def discriminator_loss(self, disc: nn.Module, img: torch.Tensor, rec: torch.Tensor,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the PatchGAN on real `img` and detached `rec`, both DiffAugmented in one batch,
        plus bCR. The caller puts `disc` in train mode and calls this only while `gan_active(step)`."""
        both = torch.cat([img, rec.detach()]).float()
        logits = disc(self._aug(both, generator)).float()
        real, fake = logits.chunk(2)
        loss = hinge_d_loss(real, fake)
        stats = {"loss/disc": loss.detach(), "gan/acc_real": (real.detach() > 0).float().mean(),
                 "gan/acc_fake": (fake.detach() < 0).float().mean()}
        if self.bcr_weight > 0:
            bcr = bcr_loss(disc, both, logits, self.diffaug, self.cutout_ratio, generator)
            loss = loss + self.bcr_weight * bcr
            stats["loss/bcr"] = bcr.detach()
        return loss, stats

    def _aug(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return diff_augment(x, self.diffaug, cutout_ratio=self.cutout_ratio, generator=generator) if self.diffaug else x


__all__ = ["ReconstructionLoss", "build_lpips", "kl_loss", "reconstruction_loss"]
