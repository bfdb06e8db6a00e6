"""Projection heads from the latent to the reference space (paper Sec. 3.1, "Matching the
Dimensionality of Distributions"): when the reference samples do not share the latent's shape, the
DM loss (Eq. 9) is computed on `head(z)`. The head is trained by the DM loss only; the decoder
never sees its output (Fig. 2).

- spatially aligned reference `(C_ref, h, w)` with the latent's `h, w`: a two-layer per-token MLP;
- any other shape (`(D,)`, `(L, D)`, another grid): a two-layer transformer decoder whose learnable
  queries cross-attend to the latent tokens (DETR, Carion et al. 2020).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HeadKind = Literal["auto", "none", "mlp", "query"]


class MLPHead(nn.Module):
    """`(B, in_ch, h, w) -> (B, out_ch, h, w)`: 1x1 conv, SiLU, 1x1 conv, applied per spatial token.

    `spatial=(h, w)`, when given, is the reference grid; a latent on another grid is rejected
    (this head cannot resample; use the query head)."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int = 256, spatial: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(in_ch, hidden, 1), nn.Conv2d(hidden, out_ch, 1)
        self.spatial = tuple(spatial) if spatial is not None else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.spatial is not None and tuple(z.shape[-2:]) != self.spatial:
            raise ValueError(f"MLPHead maps tokens in place: latent grid {tuple(z.shape[-2:])} differs from the "
                             f"reference grid {self.spatial}; use the query head (kind='query')")
        return self.fc2(F.silu(self.fc1(z)))


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sine-cosine position code `(h*w, dim)` (half the channels per axis), row-major."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim % 4 == 0, got {dim}")
    q = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


class QueryDecoderHead(nn.Module):
    """Latent `(B, in_ch, h, w)` -> reference-shaped `(B, *out_shape)` with learnable queries.

    The latent tokens (linear to `width`, plus a fixed 2D sin-cos position code, so any grid works)
    are the memory of an `nn.TransformerDecoder` (`layers` pre-norm layers, `heads` heads); each of
    `num_queries` queries emits `prod(out_shape) / num_queries` numbers. By default one query per
    reference token: `(D,)` -> 1 query, `(L, D)` -> L queries of D, `(C, H, W)` -> H*W queries of C.
    """

    def __init__(self, in_ch: int, out_shape: Sequence[int], width: int = 256, num_queries: int | None = None,
                 layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        if not 1 <= len(self.out_shape) <= 3:
            raise ValueError(f"out_shape must be (D,), (L, D) or (C, H, W), got {self.out_shape}")
        total = math.prod(self.out_shape)
        natural = math.prod(self.out_shape[1:]) if len(self.out_shape) == 3 else math.prod(self.out_shape[:-1])
        nq = num_queries or natural
        if total % nq:
            raise ValueError(f"num_queries={nq} does not divide the {total} outputs of shape {self.out_shape}")
        self.num_queries, self.per_query, self.token_layout = nq, total // nq, nq == natural
        self.width = width
        self.in_proj = nn.Linear(in_ch, width)
        self.queries = nn.Parameter(torch.randn(nq, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))
        self.out_proj = nn.Linear(width, self.per_query)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4:
            raise ValueError(f"QueryDecoderHead expects latents (B, C, h, w), got {tuple(z.shape)}")
        B, _, h, w = z.shape
        mem = self.in_proj(z.flatten(2).transpose(1, 2)) + sincos_2d(h, w, self.width, z.device).to(z.dtype)
        out = self.out_proj(self.decoder(self.queries.expand(B, -1, -1).to(z.dtype), mem))  # (B, nq, per_query)
        if self.token_layout and len(self.out_shape) == 3:
            C, H, W = self.out_shape
            return out.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return out.reshape(B, *self.out_shape)


def build_head(latent_shape: Sequence[int], reference_shape: Sequence[int], kind: HeadKind = "auto",
               hidden: int = 256, layers: int = 2, heads: int = 4) -> nn.Module:
    """The head mapping latents `(C, h, w)` (no batch dim) to reference samples `reference_shape`.

    auto: identity when the shapes are equal, the MLP when the reference is `(C_ref, h, w)` on the
    latent's grid, the query decoder otherwise. none: identity, and an error when shapes differ.
    mlp / query: that head (mlp requires the same grid)."""
    lat, ref = tuple(int(s) for s in latent_shape), tuple(int(s) for s in reference_shape)
    if len(lat) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {lat}")
    aligned = len(ref) == 3 and ref[1:] == lat[1:]
    if kind == "none" or (kind == "auto" and ref == lat):
        if ref != lat:
            raise ValueError(f"latent shape {lat} differs from reference shape {ref} and the projection head is "
                             f"'none'; set the head kind (dmd.head) to 'auto', 'mlp' or 'query'")
        return nn.Identity()
    if kind == "mlp" or (kind == "auto" and aligned):
        if not aligned:
            raise ValueError(f"an MLP head needs a spatially aligned reference (C_ref, {lat[1]}, {lat[2]}), got "
                             f"{ref} for latent {lat}; use kind='query' or 'auto'")
        return MLPHead(lat[0], ref[0], hidden, spatial=lat[1:])
    if kind in ("query", "auto"):
        width = 4 * heads * math.ceil(hidden / (4 * heads))  # hidden rounded up: divisible by heads and by 4
        return QueryDecoderHead(lat[0], ref, width=width, layers=layers, heads=heads)
    raise ValueError(f"unknown head kind {kind!r}; choose auto, none, mlp or query")


__all__ = ["HeadKind", "MLPHead", "QueryDecoderHead", "build_head", "sincos_2d"]
