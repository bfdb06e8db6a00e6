"""Pretrained feature backbones behind one interface (text encoders: `dmvae_study.text_encoders`).

A backbone maps `img (B, 3, H, W)` in [-1, 1] to a feature map `(B, out_channels, h, w)`; it owns
its input normalisation (and optional resize to `input_size`), reports `stride` (pixels of the
network input per feature cell) and `weights_source` (file + sha256 prefix, or "random-init").
Weights come only from the weights dir (`dmvae_study.weights`); random init happens only when the
caller passes `allow_random_weights=True`, and is logged and recorded.

Paper setting (App. A.1): DINOv2 ViT-L/14 run at 256 px with a patch-16 embedding -> 16x16 tokens;
timm resamples the 14x14 patch kernel (FlexiViT pseudo-inverse) and the position grid on load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmvae_study.weights import MissingWeightsError, describe, load_torch_file, random_init_notice, resolve

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base: normalisation, optional resize, freezing. Subclasses implement `features(x)`."""

    out_channels: int
    stride: int
    weights_source: str

    def __init__(self, input_size: int | None, frozen: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.input_size, self.frozen = input_size, frozen
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _finish(self) -> None:
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # A frozen backbone stays in eval mode: its BatchNorm statistics and dropout never change. A
        # fine-tuned one (the DMD stage trains the encoder, Sec. 3.1) keeps its pretrained BatchNorm
        # statistics too: only weights train, so at step 0 it computes exactly the frozen features (the
        # latents DMD starts from are the reference's, App. A.2). ViTs have no BatchNorm.
        super().train(mode and not self.frozen)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def set_drop_path(self, rate: float) -> "Backbone":
        """Stochastic depth while the backbone trains (DMD, `dmd.encoder_drop_path`); 0 = none, the default of
        every backbone here, so a fine-tuned encoder's latents are deterministic like the official DINOv2's."""
        if rate:
            raise ValueError(f"{type(self).__name__} has no stochastic depth to set (drop path {rate}); use 0")
        return self

    def unfreeze(self) -> "Backbone":
        """Make the backbone trainable (the DMD stage trains the whole encoder, Sec. 3.1)."""
        if getattr(self, "bn_fused", False):
            raise RuntimeError("this backbone had its BatchNorms folded for inference; build a fresh one to train")
        self.frozen = False
        self.requires_grad_(True)
        return self

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if s is None or tuple(img.shape[-2:]) == (s, s):
            return img
        return F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False, antialias=True)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> the network's input statistics."""
        return ((img + 1) * 0.5 - self.mean) / self.std

    def feature_hw(self, h: int, w: int) -> tuple[int, int]:
        """Feature grid for an `(h, w)` input."""
        if self.input_size is not None:
            h = w = self.input_size
        return h // self.stride, w // self.stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [-1, 1] -> `(B, out_channels, h, w)`."""
        return self.features(self.normalize(self.resize(img)))


# ---- DINOv2 (timm) -------------------------------------------------------------------------------

DINOV2_TIMM = {"vits14": "vit_small_patch14_dinov2.lvd142m", "vitb14": "vit_base_patch14_dinov2.lvd142m",
               "vitl14": "vit_large_patch14_dinov2.lvd142m"}


class DINOv2Backbone(Backbone):
    """DINOv2 patch tokens (cls dropped, after the final norm) as a `(B, C, H/p, W/p)` grid.

    `patch_size` other than 14 resamples the pretrained patch kernel on load (paper: 16 at 256 px);
    `img_size` is the grid the position embedding is resampled to once at load, other input sizes
    are interpolated on the fly (timm `dynamic_img_size`)."""

    def __init__(self, variant: str = "vitl14", weights: str | Path | None = None, *, patch_size: int = 14,
                 img_size: int = 224, input_size: int | None = None, frozen: bool = True):
        import timm
        super().__init__(input_size, frozen)
        kw: dict[str, Any] = dict(pretrained=weights is not None, img_size=input_size or img_size,
                                  patch_size=patch_size, dynamic_img_size=True, num_classes=0)
        if weights is not None:
            # timm reads the local file and runs its checkpoint_filter_fn (Meta .pth keys, patch and
            # position resampling); no hub access happens when `file` is given.
            kw["pretrained_cfg_overlay"] = dict(file=str(weights))
        self.vit = timm.create_model(DINOV2_TIMM[variant], **kw)
        self.out_channels, self.stride = int(self.vit.embed_dim), int(patch_size)
        self.weights_source = describe(weights) if weights is not None else "random-init"
        self._finish()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tok = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]    # (B, N, C)
        gh, gw = h // self.stride, w // self.stride
        return tok.transpose(1, 2).reshape(b, self.out_channels, gh, gw)


# ---- ResNet-34 (torchvision) ----------------------------------------------------------------------

class ResNet34Backbone(Backbone):
    """torchvision ResNet-34 up to `layer3` (256 ch, stride 16) or `layer4` (512 ch, stride 32)."""

    def __init__(self, weights: str | Path | None = None, *, layer: str = "layer4", input_size: int | None = None,
                 frozen: bool = True):
        import torchvision
        super().__init__(input_size, frozen)
        if layer not in ("layer3", "layer4"):
            raise ValueError(f"layer must be layer3 or layer4, got {layer!r}")
        net = torchvision.models.resnet34(weights=None)
        if weights is not None:
            net.load_state_dict(load_torch_file(weights))
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        names = names if layer == "layer4" else names[:-1]
        self.net = nn.Sequential(*[getattr(net, n) for n in names])
        self.layer = layer
        self.out_channels, self.stride = (256, 16) if layer == "layer3" else (512, 32)
        self.weights_source = describe(weights) if weights is not None else "random-init"
        self._finish()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- EfficientNet-Lite0 (offline wheel) -----------------------------------------------------------

def inline_symmetric_padding(net: nn.Module) -> int:
    """TF-"SAME" convolutions of `efficientnet_lite_pytorch` (`Conv2dStaticSamePadding`) copy their input into a
    zero-padded tensor (`nn.ZeroPad2d`) before a padding-free conv. Where that padding is symmetric (every
    stride-1 conv: k // 2 on each side) the conv's own `padding` does the same without the copy (~15% of a
    Lite0 inference pass on CPU, less in training; BENCHMARKS.md). Asymmetric pads (stride 2) stay. The same
    zeros in the same places: outputs equal (`tests/test_priors.py`). Returns the number of convs changed."""
    n = 0
    for m in net.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and tuple(m.padding) == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                m.padding, m.static_padding = (top, left), nn.Identity()
                n += 1
    return n


# EfficientNet-Lite0 block outputs: (channels, stride) of blocks 0..15 (the head: 1280 at stride 32)
LITE0_BLOCKS = ((16, 2), (24, 4), (24, 4), (40, 8), (40, 8), (80, 16), (80, 16), (80, 16), (112, 16), (112, 16),
                (112, 16), (192, 32), (192, 32), (192, 32), (192, 32), (320, 32))


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (ImageNet-1k) from the `efficientnet_lite_pytorch` package.

    Input protocol of the released model: RGB at 224 px, `(x * 255 - 127) / 128`. `forward` gives
    the head's `(B, 1280, 7, 7)` map at 224 px (`layer="head"`), or block k's output (`layer="block<k>"`,
    e.g. block10: 112 channels at stride 16); `pooled` the 1280-d vector the classifier sees (an
    FID-style feature space offline), `logits` the 1000 ImageNet logits."""

    def __init__(self, weights: str | Path | None = None, *, input_size: int | None = 224, frozen: bool = True,
                 layer: str = "head", drop_path: float = 0.0):
        from efficientnet_lite_pytorch import EfficientNet
        # mean 127/255 and std 128/255 on [0, 1] are exactly (x * 255 - 127) / 128.
        super().__init__(input_size, frozen, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The package builds Lite0 with its ImageNet recipe's drop connect (0.2, scaled by block depth), active
        # whenever the net is in train mode; a fine-tuned encoder gets what `drop_path` says (default none).
        self.set_drop_path(drop_path)
        if weights is not None:
            self.net.load_state_dict(load_torch_file(weights))
        if layer == "head":
            self.block = None
            self.out_channels, self.stride = 1280, 32
        elif layer.startswith("block") and layer[5:].isdigit() and int(layer[5:]) < len(LITE0_BLOCKS):
            self.block = int(layer[5:])
            self.out_channels, self.stride = LITE0_BLOCKS[self.block]
        else:
            raise ValueError(f"efficientnet_lite0 layer {layer!r}: choose head or block0 .. block15 "
                             f"(e.g. block10: 112 channels at stride 16)")
        self.layer = layer
        self.weights_source = describe(weights) if weights is not None else "random-init"
        self.inlined_pads = inline_symmetric_padding(self.net)
        self._finish()

    def set_drop_path(self, rate: float) -> "EfficientNetLite0Backbone":
        """Drop connect of the MBConv blocks in train mode: `rate * block / 16` per block (the package's rule)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path must lie in [0, 1), got {rate}")
        self.net._global_params = self.net._global_params._replace(drop_connect_rate=float(rate))
        return self

    @property
    def drop_path(self) -> float:
        return float(self.net._global_params.drop_connect_rate or 0.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last: its depthwise convolutions run ~1.4x faster on CPU (and use cuDNN's NHWC kernels)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.block is None:
            return self.net.extract_features(x)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        rate = net._global_params.drop_connect_rate or 0.0
        for idx, block in enumerate(net._blocks[: self.block + 1]):  # as extract_features, stopping early
            x = block(x, drop_connect_rate=rate * float(idx) / len(net._blocks) if rate else rate)
        return x

    @torch.no_grad()
    def fuse_bn_(self) -> "EfficientNetLite0Backbone":
        """Fold every BatchNorm into the conv before it (inference only; about 20% faster on CPU).
        Same outputs up to float round-off; the model can no longer be unfrozen."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        assert self.frozen, "fuse_bn_ is for frozen (inference) use"
        pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                 ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        for m in [self.net, *self.net._blocks]:
            for conv, bn in pairs:
                c, b = getattr(m, conv, None), getattr(m, bn, None)
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    setattr(m, conv, fuse_conv_bn_eval(c, b))
                    setattr(m, bn, nn.Identity())
        self.bn_fused = True
        return self

    def pooled(self, img: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [-1, 1] -> `(B, 1280)` globally pooled head features."""
        return self.forward(img).mean(dim=(2, 3))

    def logits(self, img: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [-1, 1] -> `(B, 1000)` ImageNet logits (dropout is off in eval)."""
        return self.net._fc(self.pooled(img))


# ---- registry --------------------------------------------------------------------------------------

# name -> (class, fixed kwargs); the weights table (dmvae_study.weights.WEIGHTS) uses the same names.
BACKBONES: dict[str, tuple[type[Backbone], dict[str, Any]]] = {
    "dinov2_vitl14": (DINOv2Backbone, {"variant": "vitl14"}),
    "dinov2_vitb14": (DINOv2Backbone, {"variant": "vitb14"}),
    "dinov2_vits14": (DINOv2Backbone, {"variant": "vits14"}),
    "resnet34": (ResNet34Backbone, {}),
    "efficientnet_lite0": (EfficientNetLite0Backbone, {}),
}


def build_backbone(name: str, *, weights_dir: str | os.PathLike | None = None, allow_random_weights: bool = False,
                   **kw: Any) -> Backbone:
    """A backbone from BACKBONES with its pretrained weights from the weights dir.

    Missing weights raise MissingWeightsError unless `allow_random_weights`, in which case the
    model is random-init, `weights_source == "random-init"` and a warning is logged. Extra keyword
    arguments go to the class (patch_size, img_size, input_size, layer, frozen)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    cls, fixed = BACKBONES[name]
    try:
        path: Path | None = resolve(name, weights_dir)
    except MissingWeightsError:
        if not allow_random_weights:
            raise
        log.warning(random_init_notice(name))
        path = None
    return cls(weights=path, **fixed, **kw)


# ---- grid alignment ---------------------------------------------------------------------------------

def build_grid_backbone(name: str, grid: tuple[int, int], *, vit_patch: int | None = None,
                        weights_dir: str | os.PathLike | None = None, allow_random_weights: bool = False,
                        seed: int | None = None, device: torch.device | str = "cpu",
                        **kw: Any) -> tuple[Backbone, Callable[[torch.Tensor], torch.Tensor]]:
    """A frozen backbone whose feature map lands on the tokenizer's latent `grid` (h, w): the input is
    resized to `grid * stride` pixels (ViTs with patch `vit_patch or 14`, as the paper's DINOv2-L/16
    at 256 px -> 16x16). `seed` makes a random-init net identical on every rank and rerun.
    Returns the net and `encode(img (B, C, H, W) in [-1, 1]) -> (B, D, h, w)` on `device`."""
    h, w = grid
    if name.startswith("dinov2"):
        patch = vit_patch or 14
        kw = {"patch_size": patch, "img_size": h * patch, "input_size": h * patch, **kw}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        net = build_backbone(name, weights_dir=weights_dir, allow_random_weights=allow_random_weights, **kw)
    net.input_size = h * net.stride  # conv nets: stride 32 -> grid * 32 px
    net = net.to(device).eval()

    def encode(img: torch.Tensor) -> torch.Tensor:
        img = img.to(device, non_blocking=True)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)  # grey data (data.channels=1) -> RGB backbones
        f = net(img)
        return f if tuple(f.shape[-2:]) == (h, w) else F.adaptive_avg_pool2d(f, (h, w))
    return net, encode
