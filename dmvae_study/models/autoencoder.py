"""The tokenizer: encoder (feature backbone + MLP projector) and conv decoder (paper App. A.1, Fig. 2).

    img (B, 3, H, W) in [-1, 1] --backbone--> (B, C_feat, h, w) --projector--> z (B, C, h, w)
    z --decoder--> rec (B, 3, H, W)

Backbones are any module with `out_channels: int` mapping `[-1, 1]` images to a feature map
(`dmvae_study.backbones` for DINOv2 / ResNet-34 / Lite0; `SmallConvEncoder` here for smoke runs).
The latent is deterministic for DMVAE ("ae"); the beta-VAE baseline ("beta_vae") predicts a diagonal
Gaussian (mean, logvar) and is regularised by `objectives.recon.kl_loss`.

The tokenizer owns its latent normalisation (STYLE.md): `normalize(z) = (z - latent_mean) / latent_scale`
with `latent_scale` the *standard deviation* of the latents. Note the official code stores the
reciprocal: it computes `(z - mean) * latent_scale` with `latent_scale = 1 / std`, so its released
`latent_mean=0.0685, latent_scale=0.1763` correspond here to `latent_mean=0.0685, latent_scale=1/0.1763`
(= 5.672); `set_latent_stats(mean, official_scale=...)` converts.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dmvae_study.models.decoder import AttnBlock, Decoder, ResnetBlock, group_norm

TokenizerKind = Literal["ae", "beta_vae"]


class MLPProjector(nn.Module):
    """Per-token two-layer MLP `(B, in_dim, h, w) -> (B, out_dim, h, w)`: Linear, SiLU, Linear as 1x1
    convs (App. A.1: 1024 -> 2048 -> 32, after VA-VAE). `init_std` as the official `init_weights`."""

    def __init__(self, in_dim: int = 1024, hidden: int = 2048, out_dim: int = 32, init_std: float | None = 0.02) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(in_dim, hidden, 1), nn.Conv2d(hidden, out_dim, 1)
        self.out_channels = out_dim
        if init_std is not None:
            for m in (self.fc1, self.fc2):
                nn.init.trunc_normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """Last weight before the latent: VA-VAE's adaptive alignment weight is measured here."""
        return self.fc2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class SmallConvEncoder(nn.Module):
    """Smoke-preset backbone: `(B, 3, H, W)` in [-1, 1] -> `(B, out_channels, H/stride, W/stride)`.

    A 3x3 stem, then log2(stride) stride-2 3x3 convs with GroupNorm + SiLU (channels double, capped
    at 4 * width), then a 3x3 conv. Trained from scratch: it stands in for a pretrained SSL encoder.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, stride: int = 8, norm_groups: int = 8) -> None:
        super().__init__()
        n = int(round(math.log2(stride))) if stride >= 1 else -1
        if n < 0 or 2**n != stride:
            raise ValueError(f"SmallConvEncoder stride must be a power of two, got {stride}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
        c = width
        for i in range(n):
            out = min(width * 2 ** (i + 1), 4 * width)
            layers += [group_norm(c, norm_groups), nn.SiLU(), nn.Conv2d(c, out, 3, stride=2, padding=1)]
            c = out
        layers += [group_norm(c, norm_groups), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.out_channels, self.stride = c, stride

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(img)


class Encoder(nn.Module):
    """`img (B, 3, H, W)` -> `(B, projector.out_channels, h, w)`: backbone features, then the projector.

    `freeze_backbone=True` (tokenizer pretraining, App. A.1) runs the backbone under `no_grad` in
    eval mode; the DMD stage trains the whole encoder (Sec. 3.1) via `set_backbone_frozen(False)`.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, freeze_backbone: bool = True) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise TypeError(f"backbone {type(backbone).__name__} has no `out_channels` attribute")
        self.backbone, self.projector = backbone, projector
        self.out_channels = int(getattr(projector, "out_channels"))
        self.stride = getattr(backbone, "stride", None)
        self.backbone_frozen = False
        self.set_backbone_frozen(freeze_backbone)

    def set_backbone_frozen(self, frozen: bool) -> "Encoder":
        self.backbone_frozen = frozen
        if not frozen and hasattr(self.backbone, "unfreeze"):  # dmvae_study.backbones keep their own flag
            self.backbone.unfreeze()
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()
        return self

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if self.backbone_frozen:  # frozen features never change: BatchNorm stats and dropout stay off
            self.backbone.eval()
        return self

    @property
    def last_layer(self) -> torch.Tensor:
        return self.projector.last_layer

    def forward(self, img: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """`features`: the frozen backbone's output for `img`, precomputed (a feature cache); only valid
        while the backbone is frozen."""
        if features is not None:
            if not self.backbone_frozen:
                raise ValueError("precomputed backbone features need a frozen backbone")
            return self.projector(features.to(self.projector.last_layer.dtype))
        if self.backbone_frozen:
            with torch.no_grad():
                feats = self.backbone(img)
        else:
            feats = self.backbone(img)
        return self.projector(feats)


class Tokenizer(nn.Module):
    """Encoder + decoder + latent normalisation. `kind="ae"`: deterministic latent (DMVAE);
    `kind="beta_vae"`: the encoder emits `2 * latent_channels` channels (mean, logvar).

    Shapes: `img (B, 3, H, W)` in [-1, 1]; `z (B, latent_channels, H/stride, W/stride)`.
    """

    def __init__(self, encoder: nn.Module, decoder: Decoder, kind: TokenizerKind = "ae", latent_channels: int = 32) -> None:
        super().__init__()
        if kind not in ("ae", "beta_vae"):
            raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'ae' or 'beta_vae'")
        want = latent_channels * (2 if kind == "beta_vae" else 1)
        got = getattr(encoder, "out_channels", want)
        if got != want:
            raise ValueError(f"{kind} with latent_channels={latent_channels} needs an encoder with {want} output "
                             f"channels, got {got}")
        if decoder.z_channels != latent_channels:
            raise ValueError(f"decoder takes {decoder.z_channels} latent channels, tokenizer has {latent_channels}")
        self.encoder, self.decoder, self.kind, self.latent_channels = encoder, decoder, kind, latent_channels
        self.register_buffer("latent_mean", torch.tensor(0.0))
        self.register_buffer("latent_scale", torch.tensor(1.0))

    # ---- encode / decode ------------------------------------------------------------------------
    def _enc(self, img: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(img) if features is None else self.encoder(img, features=features)

    def encode_dist(self, img: torch.Tensor, features: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """beta-VAE posterior: `(mean, logvar, sample)`, each `(B, C, h, w)`; the sample is
        reparameterised (differentiable). logvar is clamped to [-30, 20] as in LDM."""
        if self.kind != "beta_vae":
            raise ValueError("encode_dist is defined for kind='beta_vae' only; an 'ae' latent is deterministic")
        mean, logvar = self._enc(img, features).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean, logvar, mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def encode(self, img: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic latent `(B, C, h, w)` (the posterior mean for beta_vae), unnormalised.
        `features`: the frozen backbone's precomputed output for `img` (a feature cache)."""
        h = self._enc(img, features)
        return h[:, : self.latent_channels] if self.kind == "beta_vae" else h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latent `(B, C, h, w)` -> image `(B, 3, H, W)`."""
        return self.decoder(z)

    def forward(self, img: torch.Tensor, sample_posterior: bool = True, features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`(rec, z, aux)`. For beta_vae `z` is a posterior sample (the mean if not `sample_posterior`)
        and `aux` holds `mean` and `logvar` (the KL term is `objectives.recon.kl_loss`); for ae `aux` is empty.
        `features`: the frozen backbone's precomputed output for `img`."""
        if self.kind == "ae":
            z = self._enc(img, features)
            return self.decoder(z), z, {}
        mean, logvar, sample = self.encode_dist(img, features)
        z = sample if sample_posterior else mean
        return self.decoder(z), z, {"mean": mean, "logvar": logvar}

    @property
    def last_layer(self) -> torch.Tensor:
        """Decoder's last conv weight (adaptive GAN weight, Eq. 10)."""
        return self.decoder.last_layer

    # ---- latent normalisation -------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """`(z - latent_mean) / latent_scale`: what the score nets and the stage-2 DiT see."""
        return (z - self.latent_mean.to(z.dtype)) / self.latent_scale.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_scale.to(z.dtype) + self.latent_mean.to(z.dtype)

    def set_latent_stats(self, mean: float, scale: float | None = None, *, official_scale: float | None = None) -> None:
        """Set the normalisation; `scale` is a std, `official_scale` the official code's 1/std factor."""
        if (scale is None) == (official_scale is None):
            raise ValueError("give exactly one of scale (a std) or official_scale (1/std, as released)")
        s = scale if scale is not None else 1.0 / official_scale  # type: ignore[operator]
        if not (math.isfinite(mean) and math.isfinite(s) and s > 0):
            raise ValueError(f"latent stats must be finite with a positive scale, got mean={mean}, scale={s}")
        self.latent_mean.fill_(mean)
        self.latent_scale.fill_(s)

    @torch.no_grad()
    def measure_latent_stats(self, latents: Iterable[torch.Tensor]) -> tuple[float, float]:
        """Mean and std over *all* elements of the given unnormalised latents (any shapes), merged per
        batch in float64 (Chan et al.), then stored as `latent_mean`, `latent_scale`; returns them.
        (The official code averages per-batch 1/std instead; over equal-size batches of a stationary
        encoder the two agree to first order.)"""
        n, mean, m2 = 0, 0.0, 0.0
        for z in latents:
            z = z.detach().double().reshape(-1)
            nb = z.numel()
            if nb == 0:
                continue
            mb = float(z.mean())
            m2b = float(((z - mb) ** 2).sum())
            delta, tot = mb - mean, n + nb
            mean += delta * nb / tot
            m2 += m2b + delta**2 * n * nb / tot
            n = tot
        if n < 2:
            raise ValueError("measure_latent_stats needs at least two latent elements")
        std = math.sqrt(m2 / (n - 1))
        self.set_latent_stats(mean, std)
        return mean, std


class Downsample(nn.Module):
    """Asymmetric zero pad (0, 1, 0, 1) then a stride-2 3x3 conv, as the LDM / VA-VAE encoder."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LDMConvEncoder(nn.Module):
    """The LDM / VA-VAE convolutional encoder trunk (hustvl/LightningDiT `vavae/configs/f16d32_*.yaml`:
    ch 128, ch_mult (1, 1, 2, 2, 4), 2 ResNet blocks per level, attention at the coarsest level, and a
    middle block ResNet-attention-ResNet): `(B, 3, H, W) -> (B, ch * ch_mult[-1], H / s, W / s)` with
    `s = 2 ** (len(ch_mult) - 1)`, ending in GroupNorm + SiLU. The baselines' projector (a per-token
    MLP) maps it to the posterior parameters where LDM has conv_out + quant_conv."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, norm_groups: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        c = ch
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(c, ch * mult, norm_groups))
                c = ch * mult
                if i == len(ch_mult) - 1:
                    layers.append(AttnBlock(c, norm_groups))
            if i < len(ch_mult) - 1:
                layers.append(Downsample(c))
        layers += [ResnetBlock(c, c, norm_groups), AttnBlock(c, norm_groups), ResnetBlock(c, c, norm_groups),
                   group_norm(c, norm_groups), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out_channels, self.stride = c, 2 ** (len(ch_mult) - 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(img)


class AlignmentProjection(nn.Module):
    """`(B, latent_channels, h, w) -> (B, feature_dim, h, w)`, a bias-free 1x1 conv (VA-VAE reverse_proj).
    Part of the VA-VAE tokenizer's trainable parameters (train and checkpoint it with the tokenizer)."""

    def __init__(self, latent_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, 1, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


class TokenizerWithAlignment(nn.Module):
    """The trainable unit of tokenizer pretraining (one DDP module): the tokenizer, plus VA-VAE's
    alignment projection when the row is VA-VAE. `img -> (rec, z, aux)`, `aux["z_proj"]` when aligned."""

    def __init__(self, tok: nn.Module, align: nn.Module | None):
        super().__init__()
        self.tok, self.align = tok, align

    def forward(self, img: torch.Tensor, features: torch.Tensor | None = None):
        rec, z, aux = self.tok(img, features=features)
        if self.align is not None:
            aux = {**aux, "z_proj": self.align(z)}
        return rec, z, aux


class DMVAE(nn.Module):
    """The VAE side of DMD (Sec. 3.1) as one module: `img -> (rec, z, x_ref)` with
    `x_ref = head(normalize(z))` the latent seen in the reference space (the DM loss acts on it)."""

    def __init__(self, tok: nn.Module, head: nn.Module):
        super().__init__()
        self.tok, self.head = tok, head

    def to_reference(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok.normalize(z))

    def forward(self, img: torch.Tensor):
        z = self.tok.encode(img)
        return self.tok.decode(z), z, self.to_reference(z)


__all__ = ["AlignmentProjection", "DMVAE", "Downsample", "Encoder", "LDMConvEncoder", "MLPProjector",
           "SmallConvEncoder", "Tokenizer", "TokenizerKind", "TokenizerWithAlignment"]
