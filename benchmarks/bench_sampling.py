"""Stage-2 sampling (`dmvae_study.samplers.Sampler`, the paper's 250-step Euler-Maruyama SDE): images/s
of one batch through all steps, and the time for `--images` (gFID-5k: 5000) extrapolated.

The network is a random-init LightningDiT of `--size` in eval mode under inference mode (bf16 autocast
on CUDA): the cost of sampling does not depend on the weights. `--cfg-scale > 1` doubles the batch of
every network call (cond + null in one pass). The tokenizer decode and the FID feature pass are not
included (one decoder and one extractor pass per image, small next to 250 DiT passes; see
BENCHMARKS.md). FLOPs: one forward counted on the meta device, times the number of network calls.

    python -m benchmarks.bench_sampling --size tiny --batch 16 --sampler-steps 250 --steps 1      # CPU
    python -m benchmarks.bench_sampling --size XL --batch 500 --compile --steps 3                 # GPU
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from benchmarks.bench_dit import build_net, dit_flops, parse_latent
from benchmarks.common import (Result, autocast, base_parser, compile_forward, matmul_peak, median, peak_memory_mib, precision_label,
                               report, reset_peak_memory, setup, time_calls)
from dmvae_study.samplers import Sampler


def measure(size: str, *, batch: int, latent: tuple[int, int, int], num_classes: int, sampler_steps: int,
            cfg_scale: float, images: int, device: torch.device, precision: str, compile: bool, seed: int,
            steps: int, warmup: int, peak: float | None) -> Result:
    reset_peak_memory(device)
    net = build_net(size, latent, num_classes, device=device).eval().requires_grad_(False)
    if compile:
        compile_forward(net)
    sampler = Sampler(kind="sde", steps=sampler_steps, cfg_scale=cfg_scale)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(batch, *latent, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        with autocast(device, precision):
            return sampler(net, noise, y, generator=g)

    secs = time_calls(run, device, warmup=warmup, repeats=steps)
    calls = sampler_steps  # network evaluations of the SDE (steps - 1 noisy + the final mean step)
    flops = calls * dit_flops(size, batch, latent, num_classes, train=False, cfg=cfg_scale > 1)
    s = median(secs)
    c, h, w = latent
    tags = [precision_label(device, precision), f"sde{sampler_steps}", f"cfg{cfg_scale:g}"] + \
        (["compile"] if compile else [])
    return Result("sampling", f"{size}/1 {c}x{h}x{w} {' '.join(tags)}", device.type, batch, s, batch, flops, peak,
                  peak_memory_mib(device),
                  {f"minutes_for_{images}": images / (batch / s) / 60,
                   "ms_per_net_call": round(s / calls * 1e3, 3)})


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--size", default=None, help="DiT size (default: tiny on CPU, XL on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="images per sampling batch (default: 16 CPU, 500 CUDA)")
    p.add_argument("--latent", default="32x16x16")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--sampler-steps", type=int, default=250, help="SDE steps (paper: 250)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance (paper default)")
    p.add_argument("--images", type=int, default=5000, help="extrapolate the time for this many samples")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps (timed sampling batches) must be >= 1")
    device = setup(args)
    cuda = device.type == "cuda"
    size = args.size or ("XL" if cuda else "tiny")
    batch = args.batch or (500 if cuda else 16)
    peak = matmul_peak(device, args.peak_n)
    row = measure(size, batch=batch, latent=parse_latent(args.latent), num_classes=args.num_classes,
                  sampler_steps=args.sampler_steps, cfg_scale=args.cfg_scale, images=args.images, device=device,
                  precision=args.precision, compile=args.compile, seed=args.seed, steps=args.steps,
                  warmup=args.warmup, peak=peak)
    return report([row], device=device, peak_tflops=peak, json_path=args.json,
                  argv=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
