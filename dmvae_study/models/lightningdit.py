"""LightningDiT: the velocity network of every score model in DMVAE (paper Sec. 3, App. A.2-A.4).

A DiT (Peebles & Xie 2023) with the LightningDiT upgrades (Yao et al. 2025): SwiGLU FFN, RMSNorm,
axial 2D RoPE, QK-norm, AdaLN-Zero conditioning on `t + y`. Facts taken from the official code
(hustvl/LightningDiT, sen-ye/dmvae `diffusion/lightningdit/`), re-implemented here:

- SwiGLU hidden width is `int(2/3 * int(mlp_ratio * H))`, truncated, no rounding to a multiple of 8
  (XL: 3072, L: 2730, Mini: 682).
- RoPE (EVA-02 style): the head dim is split in halves, the first rotated by the patch row, the second
  by the patch column; rotation pairs are interleaved channels (2i, 2i+1); frequencies
  `theta^(-2i / (head_dim/2))`, theta = 10000. A fixed 2D sin-cos absolute embedding is added too, as the
  official model does (a frozen tensor there, a non-persistent buffer here).
- Time is embedded unscaled: continuous `t` in [0, 1] goes straight into the 256-d sinusoidal
  embedding (max period 10^4), as in SiT / LightningDiT (DiT scaled integer steps 0..999 instead).
- Label table has `num_classes + 1` rows; the last row is the null class for classifier-free guidance.

Parameter count: XL (in_channels 32, 16x16, patch 1, 1000 classes) has 674,965,856 parameters here,
exactly the official model's trainable count; the official `sum(p.numel())` reads 675,260,768 because
its frozen `pos_embed` (256 x 1152 = 294,912 values) is an `nn.Parameter` (the paper's "675M").
Ours predicts velocity only (`learn_sigma` is off in the official runs too: out_channels = in_channels).
Official checkpoints load after `convert_official_state_dict`; outputs then agree to float32 rounding.

Token-input mode (toy 2D study, App. A): build with `input_size=1` and pass `(B, C, 1, 1)` or `(B, C)`;
the output has the input's shape. One token means attention is the identity mixing and RoPE is a no-op.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dmvae_study.models.sizes import LIGHTNINGDIT_PRESETS, DiTSize


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (Zhang & Sennrich 2019; LightningDiT's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: `x (B, N, H)` scaled and shifted per sample by `(B, H)` vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rope_tables(h: int, w: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D RoPE cos/sin tables `(h*w, head_dim)` for a row-major grid of patches."""
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half/2,)
    rows = (torch.arange(h, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, -1)  # (h, half)
    cols = (torch.arange(w, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, -1)  # (w, half)
    ang = torch.cat([rows[:, None].expand(h, w, half), cols[None].expand(h, w, half)], -1).reshape(h * w, head_dim)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of `x (B, heads, N, d)` by the angles behind `cos, sin (N, d)`."""
    xf = x.float()  # rotate in float32 even for a bf16 model (its buffers may have been cast)
    rot = torch.stack((-xf[..., 1::2], xf[..., 0::2]), -1).flatten(-2)
    return (xf * cos.float() + rot * sin.float()).type_as(x)


def sincos_pos_embed(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding `(h*w, dim)`: first half encodes the column, second the row (as MAE/DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    row, col = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cat([one_d(col), one_d(row)], 1).float()


class PatchEmbed(nn.Module):
    """`(B, C, H, W)` -> tokens `(B, H/p * W/p, hidden)` with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """`t (B,)` in [0, 1] -> `(B, hidden)`: sinusoidal features (cos first, then sin) then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], -1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with a null row at index `num_classes`; label dropout for CFG (Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """`y (B,)` long or None (all null). `force_drop (B,)` bool: exactly these are dropped (no random)."""
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if force_drop is not None:
            y = torch.where(force_drop.to(device=y.device, dtype=torch.bool), self.num_classes, y)
        elif self.training and self.dropout > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.dropout, self.num_classes, y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and RoPE, via `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, rmsnorm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda d: RMSNorm(d)) if rmsnorm else (lambda d: nn.LayerNorm(d))
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm bounds attention logits (stabilises training)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    """SwiGLU FFN: `w3(silu(a) * b)` with `[a, b] = w12(x)` (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * b)


class GeluMLP(nn.Module):
    """Plain DiT FFN (tanh-GELU), used only when `use_swiglu=False`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block; AdaLN-Zero gives per-sample shift/scale/gate for both branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, swiglu: bool, rmsnorm: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(dim, rmsnorm), _norm(dim, rmsnorm)
        self.attn = Attention(dim, heads, qk_norm, rmsnorm)
        mlp_hidden = int(dim * mlp_ratio)
        # official: int(2/3 * mlp_hidden) keeps SwiGLU's parameter count close to the 4H GELU MLP
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_hidden)) if swiglu else GeluMLP(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then a linear map to `p*p*out_channels` per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, rmsnorm: bool) -> None:
        super().__init__()
        self.norm_final = _norm(dim, rmsnorm)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    """Velocity network `v(x_t, t, y)` on `(B, C, H, W)` inputs (or `(B, C)` tokens with `input_size=1`).

    `input_size` is an int (square) or `(H, W)`; both must be divisible by `patch_size`.
    `class_dropout` is the training-time label dropout probability (null class = `num_classes`).
    """

    def __init__(self, *, in_channels: int, input_size: int | tuple[int, int], patch_size: int = 1,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, class_dropout: float = 0.1, use_rope: bool = True,
                 use_qknorm: bool = True, use_swiglu: bool = True, use_rmsnorm: bool = True,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f"input_size {(H, W)} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"the 2D sin-cos embedding needs hidden_size % 4 == 0, got {hidden_size}")
        if use_rope and (hidden_size // num_heads) % 4:
            raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got head_dim {hidden_size // num_heads}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1), got {class_dropout}")
        self.in_channels = self.out_channels = in_channels  # velocity only (no learn_sigma)
        self.input_size, self.patch_size, self.num_classes = (H, W), patch_size, num_classes
        self.hidden_size, self.num_heads, self.use_rope = hidden_size, num_heads, use_rope
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        self.blocks = nn.ModuleList(LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu,
                                                      use_rmsnorm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, use_rmsnorm)
        gh, gw = H // patch_size, W // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(gh, gw, hidden_size), persistent=False)
        cos, sin = rope_tables(gh, gw, hidden_size // num_heads) if use_rope else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, zero biases; AdaLN-Zero (modulation and output layer start at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch embed initialised like a linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                        self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Tokens `(B, gh*gw, p*p*C)` -> `(B, C, gh*p, gw*p)`."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity `(B, C, H, W)` (or `(B, C)`) at `x_t` of the same shape.

        `t (B,)` (or a scalar) in [0, 1], 0 = noise; `y (B,)` long labels or None for the null class;
        `force_drop (B,)` bool replaces random label dropout with exactly these drops.
        """
        tokens_in = x.dim() == 2
        if tokens_in:
            x = x[:, :, None, None]
        B, _, H, W = x.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        dtype = self.x_embedder.proj.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        h = self.x_embedder(x.to(dtype))
        if (gh, gw) == tuple(s // self.patch_size for s in self.input_size):
            pos, cos, sin = self.pos_embed, self.rope_cos, self.rope_sin
        else:  # another resolution than built for: recompute the fixed tables
            pos = sincos_pos_embed(gh, gw, self.hidden_size).to(x.device)
            cos, sin = (z.to(x.device) for z in rope_tables(gh, gw, self.hidden_size // self.num_heads)) \
                if self.use_rope else (None, None)
        h = h + pos.to(h.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, B, x.device, force_drop)
        rope = (cos, sin) if self.use_rope else None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        out = self.unpatchify(self.final_layer(h, c), gh, gw)
        return out[:, :, 0, 0] if tokens_in else out

    def forward_cfg(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None,
                    cfg_scale: float | torch.Tensor) -> torch.Tensor:
        """Guided velocity `v_null + w (v_cond - v_null)` with cond and null in one batched pass.

        `cfg_scale` is a float or a per-sample `(B,)` tensor (guidance intervals set it to 1 outside).
        Label dropout is off here: the conditional half always sees `y`. With `y=None` there is nothing
        to guide toward: the unconditional velocity is returned.
        """
        B = x.shape[0]
        if y is None or (not torch.is_tensor(cfg_scale) and cfg_scale == 1.0):
            return self.forward(x, t, y, force_drop=torch.zeros(B, dtype=torch.bool, device=x.device))
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        v_cond, v_null = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), drop).chunk(2)
        w = torch.as_tensor(cfg_scale, device=x.device, dtype=v_cond.dtype)
        if w.dim() == 1:
            w = w.reshape(B, *([1] * (x.dim() - 1)))
        return v_null + w * (v_cond - v_null)


def convert_official_state_dict(sd: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Map an official LightningDiT state dict onto this module (`load_state_dict(..., strict=True)`).

    Drops the fixed tables (`pos_embed`, `feat_rope.*`; recomputed here). A checkpoint trained with
    `class_dropout_prob=0` has no null row; a zero row is appended (the null class then adds nothing).
    """
    out = {k: v for k, v in sd.items() if k != "pos_embed" and not k.startswith("feat_rope.")}
    table = out["y_embedder.embedding_table.weight"]
    if table.shape[0] == num_classes:
        out["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return out


def build_lightningdit(size: str, *, in_channels: int, input_size: int | tuple[int, int], patch_size: int = 1,
                       num_classes: int, class_dropout: float = 0.1, **kw) -> LightningDiT:
    """A LightningDiT of a named preset size; extra keywords go to `LightningDiT`."""
    if size not in LIGHTNINGDIT_PRESETS:
        raise ValueError(f"unknown LightningDiT size {size!r}; choose one of {', '.join(LIGHTNINGDIT_PRESETS)}")
    depth, hidden, heads = LIGHTNINGDIT_PRESETS[size]
    return LightningDiT(in_channels=in_channels, input_size=input_size, patch_size=patch_size, hidden_size=hidden,
                        depth=depth, num_heads=heads, num_classes=num_classes, class_dropout=class_dropout, **kw)


__all__ = ["LIGHTNINGDIT_PRESETS", "DiTSize", "LightningDiT", "build_lightningdit", "convert_official_state_dict"]
