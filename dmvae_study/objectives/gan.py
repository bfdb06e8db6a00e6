"""The PatchGAN objective pieces of the tokenizer loss (paper Eq. 10; official `train_tokenizer.py`):
hinge losses, DiffAugment (Zhao et al. 2020) on every discriminator input, and balanced consistency
regularisation (bCR). The discriminator network itself is `dmvae_study.models.discriminator`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss `0.5 (E relu(1 - D(x)) + E relu(1 + D(x_rec)))`."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: `-E D(x_rec)`."""
    return -logits_fake.mean()


# ---- DiffAugment -----------------------------------------------------------------------------------

def _rand(B: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample uniforms `(B, 1, 1, 1)` on x's device (drawn where the generator lives)."""
    dev = generator.device if generator is not None else x.device
    return torch.rand(B, 1, 1, 1, generator=generator, device=dev).to(device=x.device, dtype=x.dtype)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    B = x.shape[0]
    x = x + (_rand(B, x, g) - 0.5)                                   # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(B, x, g) * 2.0) + m                         # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(B, x, g) + 0.5) + m                      # contrast


def _shift_index(n: int, shift: torch.Tensor) -> torch.Tensor:
    """Source rows `(B, n)` into a 1-pixel zero-padded axis: out-of-range positions hit the padding."""
    idx = torch.arange(n, device=shift.device).unsqueeze(0) - shift.unsqueeze(1) + 1
    return idx.clamp(0, n + 1)


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    """Integer shift per sample, uniform in [-ratio*H, ratio*H] x [-ratio*W, ratio*W], zero fill."""
    B, C, H, W = x.shape
    dh, dw = round(H * ratio), round(W * ratio)
    sh = (_rand(B, x, g).flatten().float() * (2 * dh + 1)).floor().long() - dh
    sw = (_rand(B, x, g).flatten().float() * (2 * dw + 1)).floor().long() - dw
    ih, iw = _shift_index(H, sh), _shift_index(W, sw)                 # (B, H), (B, W)
    xp = F.pad(x, (1, 1, 1, 1))
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, ih[:, :, None], iw[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float) -> torch.Tensor:
    """Zero one square of side ratio*H x ratio*W per sample, centre uniform over the image (clipped)."""
    B, C, H, W = x.shape
    ch, cw = round(H * ratio), round(W * ratio)
    cy = (_rand(B, x, g).flatten().float() * H).floor()
    cx = (_rand(B, x, g).flatten().float() * W).floor()
    ys = torch.arange(H, device=x.device, dtype=torch.float32)[None, :] - (cy[:, None] - ch // 2)
    xs = torch.arange(W, device=x.device, dtype=torch.float32)[None, :] - (cx[:, None] - cw // 2)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]   # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout", *, translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment `(B, C, H, W) -> (B, C, H, W)`, each sample with its own random parameters; gradients
    flow to `x` (the shift is a gather, the cutout a mask). `policy`: comma-separated subset of
    color, translation, cutout, in that order; "" returns x unchanged."""
    ops = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = set(ops) - {"color", "translation", "cutout"}
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {sorted(unknown)}; choose from color, translation, cutout")
    if "color" in ops:
        x = _color(x, generator)
    if "translation" in ops:
        x = _translation(x, generator, translation_ratio)
    if "cutout" in ops:
        x = _cutout(x, generator, cutout_ratio)
    return x


def bcr_loss(disc: nn.Module, images: torch.Tensor, logits: torch.Tensor, policy: str = "color,translation,cutout",
             cutout_ratio: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Balanced consistency regularisation as in the official tokenizer: the discriminator's logits on
    a second, independent augmentation of the same (real and fake) images must match `logits`
    (the logits on the first augmentation), `mse(D(aug2(images)), logits)`; both sides keep grads."""
    logits2 = disc(diff_augment(images, policy, cutout_ratio=cutout_ratio, generator=generator))
    return F.mse_loss(logits2.float(), logits.float())


__all__ = ["bcr_loss", "diff_augment", "hinge_d_loss", "hinge_g_loss"]
