"""Model construction from config sections: the one place that maps a config to modules.

Stages, studies, benchmarks and tests build networks here, so a field's meaning is fixed once.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from dmvae_study.config import ExperimentConfig, GeneratorConfig, TeacherConfig, latent_shape
from dmvae_study.models.lightningdit import LightningDiT, build_lightningdit


def build_dit(dcfg: TeacherConfig | GeneratorConfig, sample_shape: tuple[int, int, int],
              num_classes: int) -> LightningDiT:
    """LightningDiT for samples `(C, H, W)`; `num_classes` 0 means unconditional (one class)."""
    c, h, w = sample_shape
    if h % dcfg.patch_size or w % dcfg.patch_size:
        raise ValueError(f"sample grid {h}x{w} is not divisible by the DiT patch size {dcfg.patch_size}; "
                         f"set patch_size=1 or change the latent grid")
    return build_lightningdit(dcfg.size, in_channels=c, input_size=(h, w), patch_size=dcfg.patch_size,
                              num_classes=max(num_classes, 1), class_dropout=dcfg.class_dropout,
                              grad_checkpointing=dcfg.grad_checkpointing)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 prefix over a state dict's tensors: proves which weights a stage loaded."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()[:16]


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---- tokenizer ---------------------------------------------------------------------------------------

def build_encoder_backbone(cfg: ExperimentConfig, seed: int | None = None, device: str = "cpu") -> nn.Module:
    """The encoder's feature network on the latent grid (`config.latent_shape`): the small conv encoder
    (smoke presets), the LDM / VA-VAE conv encoder (`ldm_conv`, the baselines), both trained, or a
    pretrained backbone whose input is resized so its feature map lands on the grid (DINOv2-L/16 at
    256 px -> 16x16, App. A.1)."""
    t = cfg.tokenizer
    if t.backbone == "small_conv":
        from dmvae_study.models.autoencoder import SmallConvEncoder
        return SmallConvEncoder(in_channels=3, width=t.encoder_width, stride=t.encoder_stride,
                                norm_groups=min(8, t.encoder_width))
    if t.backbone == "ldm_conv":
        from dmvae_study.models.autoencoder import LDMConvEncoder
        return LDMConvEncoder(in_channels=3, ch=t.encoder_width, ch_mult=t.encoder_ch_mult,
                              num_res_blocks=t.decoder_res_blocks, norm_groups=min(32, t.encoder_width))
    from dmvae_study.backbones import build_grid_backbone
    _, h, w = latent_shape(cfg)
    kw = {"layer": t.backbone_layer} if t.backbone_layer else {}
    net, _ = build_grid_backbone(t.backbone, (h, w), vit_patch=t.backbone_patch, weights_dir=cfg.run.weights_dir,
                                 allow_random_weights=cfg.run.allow_random_weights, seed=seed, device=device, **kw)
    return net


def build_tokenizer(cfg: ExperimentConfig, kind: str = "ae", device: str = "cpu") -> nn.Module:
    """Encoder (backbone + MLP projector, App. A.1) and Flux-style decoder of `cfg.tokenizer` (a resolved
    row config: for the baseline rows that section is their own autoencoder). `kind`: ae / beta_vae /
    vavae (a VA-VAE is an ae whose pretraining adds the alignment loss). `device="meta"` builds shapes
    only (cost estimates)."""
    from dmvae_study.models.autoencoder import Encoder, MLPProjector, Tokenizer
    from dmvae_study.models.decoder import Decoder
    t = cfg.tokenizer
    latent_c, h, w = latent_shape(cfg)
    backbone = build_encoder_backbone(cfg, seed=cfg.run.seed, device=device)
    out = latent_c * (2 if kind == "beta_vae" else 1)
    frozen = t.freeze_backbone and t.backbone not in ("small_conv", "ldm_conv")  # conv encoders train from scratch
    enc = Encoder(backbone, MLPProjector(backbone.out_channels, t.projector_hidden, out), frozen)
    dec = Decoder(latent_c, out_channels=3, ch=t.decoder_ch, ch_mult=t.decoder_ch_mult,
                  num_res_blocks=t.decoder_res_blocks, mid_attention=t.decoder_attention,
                  norm_groups=min(32, t.decoder_ch), in_upsample=t.decoder_in_upsample)
    return Tokenizer(enc, dec, kind="beta_vae" if kind == "beta_vae" else "ae", latent_channels=latent_c)


def load_tokenizer(art, device: torch.device | str = "cpu", trainable: bool = False) -> nn.Module:
    """The final weights (EMA, with latent stats) of a tokenizer artifact (`tokenizer.pt`)."""
    from dmvae_study.config import ExperimentConfig as EC
    from dmvae_study.store import load_torch
    path = art.file("tokenizer.pt")
    if not path.exists():
        raise FileNotFoundError(f"no finished tokenizer at {art.path}: run its stage first")
    blob = load_torch(path)
    cfg = EC.from_dict(blob["config"])
    tok = build_tokenizer(cfg, blob["kind"])
    tok.load_state_dict(blob["state"])
    tok.to(device)
    if trainable:
        return tok.train()
    return tok.eval().requires_grad_(False)


def for_inference(tok: nn.Module) -> nn.Module:
    """A loaded, frozen tokenizer prepared for encoding only: a frozen backbone with BatchNorms gets them
    folded into its convolutions (EfficientNet-Lite0: same outputs up to float round-off, ~3x faster on
    CPU together with channels_last). Training code never sees the folded copy."""
    bb = getattr(getattr(tok, "encoder", None), "backbone", None)
    if bb is not None and getattr(bb, "frozen", False) and hasattr(bb, "fuse_bn_") and not getattr(bb, "bn_fused", False):
        bb.fuse_bn_()
    return tok
