"""Tokenizer pretraining step (stage 1, `trainers.tokenizer.step`, kind "ae"): encoder (frozen
backbone + trainable projector) + Flux-style decoder, L1 (+ LPIPS) + PatchGAN generator loss with the
adaptive weight, AdamW, EMA, then the discriminator step (hinge + DiffAugment + bCR).

`--channels-last` puts the decoder and the PatchGAN in `torch.channels_last` (cuDNN's native NHWC
layout for bf16 convs on tensor cores), as `StageContext.channels_last` does in the trainers on CUDA;
here it applies on any device so the CPU can compare both layouts. `--no-gan`
measures the steps before `disc_start` (no discriminator). Images are random tensors on the
device; `--preset imagenet256` uses a random-init DINOv2-L/16 at 256 px and a random-trunk LPIPS
VGG (the FLOPs of the real run, not its weights).

    python -m benchmarks.bench_tokenizer --preset smoke --batch 8 --steps 3                     # CPU
    python -m benchmarks.bench_tokenizer --preset imagenet256 --batch 32 --channels-last --steps 10
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

import torch

from benchmarks.common import (Result, base_parser, count_flops, matmul_peak, median, peak_memory_mib,
                               precision_label, report, reset_peak_memory, setup, time_calls)
from dmvae_study.config import latent_shape
from dmvae_study.presets import preset
from dmvae_study.objectives.recon import ReconstructionLoss, build_lpips
from trainers import tokenizer


STEP = tokenizer.step  # the training stage's own step function


class TokenizerStep:
    """The stage's own state (`trainers.tokenizer.setup`) and step (`trainers.tokenizer.step`) on random
    images; LPIPS with a random trunk (no weights needed, same FLOPs)."""

    def __init__(self, preset_name: str, *, batch: int, device: torch.device, precision: str, channels_last: bool,
                 gan: bool, lpips: bool | None, seed: int):
        from dmvae_study.pipeline import resolve
        from trainers.common import StageContext
        from trainers.tokenizer import setup
        cfg = resolve(preset(preset_name, {"run.allow_random_weights": True,
                                           "run.precision": precision_label(device, precision),
                                           "run.seed": seed, "tokenizer.batch_size": batch, "run.num_workers": 1}),
                      "dinov2")
        t = cfg.tokenizer
        self.cfg, self.device, self.batch, self.step_i = cfg, device, batch, 0
        self.ctx = StageContext(cfg=cfg, stage="tokenizer", device=device)
        use_lpips = (t.lpips_weight > 0) if lpips is None else lpips
        lp = build_lpips(t.lpips_net, pnet_rand=True).to(device) if use_lpips else None
        self.rloss = ReconstructionLoss(lpips_weight=t.lpips_weight if use_lpips else 0.0, disc_weight=t.disc_weight,
                                        disc_start=0 if gan else None,
                                        diffaug="color,translation,cutout" if t.diffaug else "", lpips_module=lp)
        self.state, _ = setup(self.ctx, rloss=self.rloss, device=str(device))
        self.tok, self.disc = self.state.tok, self.state.disc
        r = cfg.data.resolution
        g = torch.Generator().manual_seed(seed)
        self.img = (torch.rand(batch, 3, r, r, generator=g) * 2 - 1).to(device)
        if channels_last:  # what StageContext.channels_last does on CUDA, here on any device
            for m in (self.tok.decoder, self.disc):
                m.to(memory_format=torch.channels_last)
        self.latent = latent_shape(cfg)

    def step(self) -> None:
        """One iteration of the stage: `STEP` is `trainers.tokenizer.step`, the function its loop calls."""
        STEP(self.state, self.step_i, self.img)
        self.step_i += 1


def measure(preset_name: str, *, batch: int, device: torch.device, precision: str, channels_last: bool, gan: bool,
            lpips: bool | None, seed: int, steps: int, warmup: int, peak: float | None, count: bool = True) -> Result:
    reset_peak_memory(device)
    bench = TokenizerStep(preset_name, batch=batch, device=device, precision=precision, channels_last=channels_last,
                          gan=gan, lpips=lpips, seed=seed)
    flops = count_flops(bench.step) if count else None
    secs = time_calls(bench.step, device, warmup=warmup, repeats=steps)
    t = bench.cfg.tokenizer
    tags = [precision_label(device, precision)] + [s for s, on in (("channels_last", channels_last), ("gan", gan),
                                                                    ("lpips", bench.rloss.lpips_module is not None))
                                                   if on]
    c, h, w = bench.latent
    return Result("tokenizer_step", f"{preset_name} {' '.join(tags)}", device.type, batch, median(secs), batch, flops,
                  peak, peak_memory_mib(device),
                  {"encoder": t.backbone, "resolution": bench.cfg.data.resolution, "latent": f"{c}x{h}x{w}",
                   "min_ms": round(min(secs) * 1e3, 2)})


def count_only(preset_name: str, *, gan: bool, lpips: bool | None) -> dict[str, float]:
    """Per-image model FLOPs of the tokenizer step and its parts, on the meta device (no memory)."""
    meta = torch.device("meta")
    with meta, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pretrained tensors loaded into meta params: no-ops
        b = TokenizerStep(preset_name, batch=1, device=meta, precision="fp32", channels_last=False, gan=gan,
                          lpips=lpips, seed=0)
    b.ctx.finite_or_skip = lambda loss: True  # a meta tensor has no value to read
    out = {"train_step": count_flops(b.step)}
    with torch.no_grad():
        out["encoder_fwd"] = count_flops(lambda: b.tok.encode(b.img))
        out["decoder_fwd"] = count_flops(lambda: b.tok.decode(torch.zeros(1, *b.latent, device=meta)))
        if b.rloss.lpips_module is not None:
            out["lpips_fwd_pair"] = count_flops(lambda: b.rloss.lpips_module(b.img, b.img))
        out["disc_fwd"] = count_flops(lambda: b.disc(b.img))
    print(f"Tokenizer step FLOPs per image ({preset_name}, gan={gan}):\n| part | GFLOP/img |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v / 1e9:.1f} |")
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0], compile_flag=False)
    p.add_argument("--preset", default=None, help="smoke (CPU default), fmnist, imagenet256 (CUDA default)")
    p.add_argument("--batch", type=int, default=None, help="batch per step (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--channels-last", default="off", choices=["off", "on", "both"],
                   help="memory format of the conv nets; both: one row each")
    p.add_argument("--no-gan", action="store_true", help="before disc_start: no PatchGAN terms")
    p.add_argument("--lpips", default=None, choices=["on", "off"], help="LPIPS term (default: as the preset)")
    p.add_argument("--count-only", action="store_true", help="FLOPs per image on the meta device, no timing")
    args = p.parse_args(argv)
    device = setup(args)
    cuda = device.type == "cuda"
    preset_name = args.preset or ("imagenet256" if cuda or args.count_only else "smoke")
    if args.count_only:
        return {"flops": count_only(preset_name, gan=not args.no_gan,
                                    lpips=None if args.lpips is None else args.lpips == "on")}
    batch = args.batch or (32 if cuda else 8)
    peak = matmul_peak(device, args.peak_n)
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    rows = [measure(preset_name, batch=batch, device=device, precision=args.precision, channels_last=cl,
                    gan=not args.no_gan, lpips=None if args.lpips is None else args.lpips == "on", seed=args.seed,
                    steps=args.steps, warmup=args.warmup, peak=peak) for cl in layouts]
    return report(rows, device=device, peak_tflops=peak, json_path=args.json,
                  argv=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
