"""Flux / LDM-style convolutional decoder of the tokenizer (paper App. A.1: "a convolution-based
architecture similar to Flux"): conv_in, a middle block (ResNet, self-attention, ResNet), then one
level per entry of `ch_mult` from coarse to fine, each `num_res_blocks + 1` ResNet blocks and a
nearest-neighbour x2 upsample + 3x3 conv between levels, then GroupNorm, SiLU, conv_out.

Upsampling factor (pixels per latent cell): `2 ** (len(ch_mult) - 1 + in_upsample)`.
  - The official DMVAE decoder (`models/flux_ae.py` + `Decoder.post_init`) uses ch_mult (1, 2, 4, 4)
    and one extra upsample of the latent itself before conv_in, i.e. `in_upsample=True`: x16 for
    16x16 latents at 256 px, with the middle block (and its attention) running at 32x32.
  - `in_upsample=False` (default) puts every upsample between levels: ch_mult (1, 2, 4, 4, 4) gives
    x16 with the middle block at 16x16 (one more ResNet level than the official layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with `gcd(groups, channels)` groups, so narrow presets (ch=16) stay valid."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """`(B, C_in, H, W) -> (B, C_out, H, W)`: two (GroupNorm, SiLU, 3x3 conv) + a 1x1 shortcut if C changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 32) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the `H*W` positions of `(B, C, H, W)`, residual."""

    def __init__(self, ch: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Latent `(B, z_channels, h, w)` -> image `(B, out_channels, h*stride, w*stride)` (unbounded; the
    targets live in [-1, 1]). `stride = 2 ** (len(ch_mult) - 1 + in_upsample)`.

    `init_std`: truncated-normal std of every conv weight (biases 0), as the official tokenizer
    (`init_weights(decoder, 0.02)`); None keeps PyTorch's default init.
    """

    def __init__(self, z_channels: int, out_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, mid_attention: bool = True, norm_groups: int = 32,
                 in_upsample: bool = False, init_std: float | None = 0.02) -> None:
        super().__init__()
        if not ch_mult:
            raise ValueError("ch_mult needs at least one level")
        self.z_channels, self.ch_mult = z_channels, tuple(ch_mult)
        self.stride = 2 ** (len(ch_mult) - 1 + int(in_upsample))
        c = ch * ch_mult[-1]
        self.in_up = Upsample(z_channels) if in_upsample else nn.Identity()
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(c, c, norm_groups),
                                 AttnBlock(c, norm_groups) if mid_attention else nn.Identity(),
                                 ResnetBlock(c, c, norm_groups))
        levels = []
        for i in reversed(range(len(ch_mult))):  # coarse -> fine
            out = ch * ch_mult[i]
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, out, norm_groups))
                c = out
            if i > 0:
                blocks.append(Upsample(c))
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out = group_norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.trunc_normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: where the adaptive GAN weight compares gradient norms (Eq. 10)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"decoder expects (B, {self.z_channels}, h, w) latents, got {tuple(z.shape)}")
        h = self.mid(self.conv_in(self.in_up(z)))
        return self.conv_out(F.silu(self.norm_out(self.up(h))))


# Named layouts (keyword sets for `Decoder`); the config's decoder_* fields override them.
DECODER_PRESETS: dict[str, dict] = {
    "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attention=False),             # x4
    "small": dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, mid_attention=True),          # x8
    "flux_official": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_upsample=True),   # x16 (official)
    "flux_f16": dict(ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2),                       # x16
}

__all__ = ["AttnBlock", "DECODER_PRESETS", "Decoder", "ResnetBlock", "Upsample", "group_norm"]
