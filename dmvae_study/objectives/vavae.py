"""VA-VAE's vision-foundation alignment loss (Yao et al. 2025; the VA-VAE baseline row, paper Eq. 2).

Facts taken from hustvl/LightningDiT (`vavae/ldm/modules/losses/contperceptual.py`, config
`vavae/configs/f16d32_vfdinov2.yaml`):
- the latent z `(B, C, h, w)` is projected to the feature dim by a bias-free 1x1 conv
  (`reverse_proj: true`, latent -> DINOv2 dim; `models.autoencoder.AlignmentProjection`), and compared with the frozen features `(B, D, h, w)`;
- marginal cosine loss      mean over tokens of relu(1 - m1 - cos(z'_i, f_i)),          m1 = 0.5;
- marginal distance-matrix  mean over token pairs of relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2), m2 = 0.25;
  (pairs within one image), both weighted 1 and summed;
- adaptive weight `0.1 * ||grad_enc L_rec|| / (||grad_enc L_vf|| + 1e-4)`, clamped to [0, 1e8],
  measured at the encoder's last layer (VA-VAE: `encoder.conv_out.weight`; here the projector's last
  layer, `Encoder.last_layer`), where L_rec is the pixel + LPIPS term (no GAN, no KL).
Assumption: the VA-VAE posterior *sample* is what is aligned (their `forward` samples); the caller
chooses which latent to pass. Feature and latent grids must agree (16x16 for f16 at 256 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dmvae_study.objectives.gradients import grad_norm_ratio


def vf_alignment_loss(z_proj: torch.Tensor, features: torch.Tensor, cos_margin: float = 0.5,
                      distmat_margin: float = 0.25, cos_weight: float = 1.0, distmat_weight: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Margin cosine + margin distance-matrix loss between projected latents and features, both
    `(B, D, h, w)`; zero when every token's cosine to its feature is >= 1 - m1 and every pairwise-cosine
    gap is <= m2 (in particular when `z_proj == features`)."""
    if z_proj.shape != features.shape:
        raise ValueError(f"projected latents {tuple(z_proj.shape)} and features {tuple(features.shape)} must "
                         f"share (B, D, h, w); resize the features to the latent grid or fix the projection dim")
    zf = F.normalize(z_proj.float().flatten(2), dim=1)        # (B, D, N), unit per token
    ff = F.normalize(features.float().flatten(2), dim=1).detach()
    cos = (zf * ff).sum(dim=1)                                 # (B, N)
    l_cos = F.relu(1.0 - cos_margin - cos).mean()
    gram_z, gram_f = zf.transpose(1, 2) @ zf, ff.transpose(1, 2) @ ff   # (B, N, N)
    l_dist = F.relu((gram_z - gram_f).abs() - distmat_margin).mean()
    loss = cos_weight * l_cos + distmat_weight * l_dist
    return loss, {"vf/cos": l_cos.detach(), "vf/distmat": l_dist.detach(), "loss/vf": loss.detach()}


@dataclass
class VAVAEAlignmentLoss:
    """Weighted VA-VAE term to add to the tokenizer loss. With `adaptive`, pass the reconstruction
    loss (pixel + LPIPS) and the encoder's last layer; else the weight is `vf_weight` itself."""

    vf_weight: float = 0.1
    cos_margin: float = 0.5
    distmat_margin: float = 0.25
    cos_weight: float = 1.0
    distmat_weight: float = 1.0
    adaptive: bool = True
    max_adaptive_weight: float = 1e8

    def __call__(self, z: torch.Tensor, features: torch.Tensor, projection: nn.Module,
                 rec_loss: torch.Tensor | None = None, last_layer: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`z (B, C, h, w)` latent, `features (B, D, h, w)` frozen foundation features; returns
        (weight * L_vf, stats)."""
        loss, stats = vf_alignment_loss(projection(z), features, self.cos_margin, self.distmat_margin,
                                        self.cos_weight, self.distmat_weight)
        if self.adaptive:
            if rec_loss is None or last_layer is None:
                raise ValueError("adaptive VA-VAE weight needs rec_loss and the encoder's last_layer")
            w = self.vf_weight * grad_norm_ratio(rec_loss, loss, last_layer, eps=1e-4, max_value=self.max_adaptive_weight)
        else:
            w = torch.tensor(self.vf_weight, device=loss.device)
        stats["vf/weight"] = w.detach()
        return w * loss, stats


__all__ = ["VAVAEAlignmentLoss", "vf_alignment_loss"]
