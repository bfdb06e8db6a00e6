"""One DMD joint step (stage 4), averaged over a `vae_every`-step cycle.

The step timed is the stage's own `trainers.dmd.step` on the state `trainers.dmd.make_state` builds
(DMVAE, projection head, PatchGAN, ReconstructionLoss, DistributionMatchingLoss, fake_score_loss, the
config's optimisers, StageContext), so the benchmark cannot drift from the trainer:

- VAE turn (step % k == 0): encoder (trainable) + decoder, L1 (+ LPIPS) + GAN generator loss with the
  adaptive weight, the DM loss (real and fake score nets, batched cond + null pass when CFG > 1),
  backward, AdamW, EMA; then the discriminator step.
- every step: the fake score net's flow-matching step (Eq. 8) on the current latents (re-encoded
  under no_grad on the steps without a VAE turn).

Images are random tensors on the device (loading is `bench_features`' job); the score nets start
from random weights (same FLOPs as a teacher). With `--preset imagenet256` the encoder is a
random-init DINOv2-L/16 at 256 px and LPIPS a random-trunk VGG (`pnet_rand`): the FLOPs of the real
thing, none of its weights. The reported figure is the median cycle time / k, with the ratio to a
DiT training step (`bench_dit`, trainer mode) of the same size, batch and latent shape measured in
the same process. Target on one H100: <= 3x the DiT-L step.

    python -m benchmarks.bench_dmd --preset smoke --size tiny --batch 8 --steps 2              # CPU
    python -m benchmarks.bench_dmd --preset imagenet256 --size L --batch 32 --cfg-scale 5 --steps 3
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Sequence

import torch

from benchmarks import bench_dit
from benchmarks.common import (Result, base_parser, compile_forward, count_flops, matmul_peak, median, peak_memory_mib,
                               precision_label, report, reset_peak_memory, setup, sync, time_calls)
from dmvae_study.build import build_tokenizer
from dmvae_study.config import latent_shape
from dmvae_study.presets import preset
from dmvae_study.models.lightningdit import build_lightningdit
from dmvae_study.objectives.recon import ReconstructionLoss, build_lpips
from trainers import dmd


STEP = dmd.step  # the training stage's own step function (tests check the identity)


class DMDStep:
    """The training stage's own DMD step (`trainers.dmd.step`) on the state `trainers.dmd.make_state` builds,
    from random-init modules instead of artifacts (same shapes, same FLOPs)."""

    def __init__(self, preset_name: str, size: str, *, batch: int, device: torch.device, precision: str,
                 cfg_scale: float, vae_every: int, lpips: bool | None, seed: int, overrides: Sequence[str] = (),
                 dataset_size: int = bench_dit.IMAGENET_TRAIN):
        from dmvae_study.pipeline import resolve
        from trainers.common import StageContext
        from trainers.dmd import make_state
        from trainers.tokenizer import build_discriminator
        over = {"run.allow_random_weights": True, "run.precision": precision_label(device, precision), "run.seed": seed,
                "teacher.size": size, "dmd.batch_size": batch, "dmd.cfg_scale": cfg_scale,
                "dmd.vae_every": vae_every, "run.num_workers": 1}
        cfg = preset(preset_name, over)
        if overrides:
            from dmvae_study.configlib import apply_overrides
            cfg = apply_overrides(cfg, list(overrides))
        cfg = resolve(cfg, "dinov2")
        self.cfg, self.device, d, t = cfg, device, cfg.dmd, cfg.tokenizer
        self.ctx = StageContext(cfg=cfg, stage="dmd", device=device)
        self.latent = latent_shape(cfg)
        c, h, w = self.latent
        tok = build_tokenizer(cfg, "ae", device=str(device)).to(device).train()
        use_lpips = (t.lpips_weight > 0) if lpips is None else lpips
        lp = build_lpips(t.lpips_net, pnet_rand=True).to(device) if use_lpips else None
        rloss = ReconstructionLoss(lpips_weight=t.lpips_weight if use_lpips else 0.0, disc_weight=t.disc_weight,
                                   disc_start=d.gan_start, diffaug="color,translation,cutout" if t.diffaug else "",
                                   lpips_module=lp)
        self.num_classes = cfg.data.num_classes
        real = build_lightningdit(size, in_channels=c, input_size=(h, w), num_classes=self.num_classes,
                                  class_dropout=cfg.teacher.class_dropout).to(device)
        self.state = make_state(self.ctx, tok, (c, h, w), real, build_discriminator(cfg).to(device), rloss,
                                use_y=True)
        self.tok, self.disc, self.rloss = tok, self.state.disc, rloss
        r = cfg.data.resolution
        g = torch.Generator().manual_seed(seed)
        self.img_pool = (torch.rand(2 * batch, 3, r, r, generator=g) * 2 - 1).to(device)
        self.y_pool = torch.randint(0, self.num_classes, (2 * batch,), generator=g).to(device)
        self.batch, self.vae_every, self.step_i, self.dataset_size = batch, vae_every, 0, dataset_size

    def compile(self) -> None:
        for net in (self.state.real, self.state.fake):
            compile_forward(net)

    def step(self) -> None:
        """One iteration of the DMD stage: `STEP` is `trainers.dmd.step`, the function the stage's loop calls."""
        idx = self.ctx.batch_indices(self.dataset_size, self.batch, self.step_i) % self.img_pool.shape[0]
        idx = idx.to(self.device)
        STEP(self.state, self.step_i, self.img_pool[idx], self.y_pool[idx])
        self.step_i += 1

    def cycle(self) -> None:
        for _ in range(self.vae_every):
            self.step()


def measure(preset_name: str, size: str, *, batch: int, device: torch.device, precision: str, cfg_scale: float,
            vae_every: int, lpips: bool | None, compile: bool, seed: int, steps: int, warmup: int,
            peak: float | None, count: bool = True, with_dit: bool = True,
            overrides: Sequence[str] = ()) -> list[Result]:
    reset_peak_memory(device)
    bench = DMDStep(preset_name, size, batch=batch, device=device, precision=precision, cfg_scale=cfg_scale,
                    vae_every=vae_every, lpips=lpips, seed=seed, overrides=overrides)
    flops = count_flops(bench.cycle) if count else None  # one eager cycle, before any compile
    if compile:
        bench.compile()
    for _ in range(warmup):
        bench.cycle()
    sync(device)
    secs = time_calls(bench.step, device, warmup=0, repeats=steps * vae_every)
    cycles = [sum(secs[i:i + vae_every]) for i in range(0, len(secs), vae_every)]
    per_step = median(cycles) / vae_every
    vae_turns = [s for i, s in enumerate(secs) if i % vae_every == 0]
    fake_turns = [s for i, s in enumerate(secs) if i % vae_every != 0]
    tags = [precision_label(device, precision), f"cfg{cfg_scale:g}", f"k{vae_every}"] + (["compile"] if compile else [])
    c, h, w = bench.latent
    extra: dict[str, Any] = {"vae_turn_ms": round(median(vae_turns) * 1e3, 2),
                             "fake_turn_ms": round(median(fake_turns) * 1e3, 2) if fake_turns else None,
                             "resolution": bench.cfg.data.resolution, "latent": f"{c}x{h}x{w}",
                             "encoder": bench.cfg.tokenizer.backbone}
    rows = [Result("dmd_step", f"{preset_name} {size} {' '.join(tags)}", device.type, batch, per_step, batch,
                   None if flops is None else flops / vae_every, peak, peak_memory_mib(device), extra)]
    del bench
    if with_dit:
        dit = bench_dit.measure(size, batch=batch, latent=(c, h, w), num_classes=cfg_classes(preset_name),
                                patch=1, device=device, precision=precision, compile=compile, grad_ckpt=False,
                                mode="trainer", dataset_size=bench_dit.IMAGENET_TRAIN, seed=seed, steps=steps,
                                warmup=warmup, peak=peak)
        rows.append(dit)
        extra["ratio_to_dit_step"] = round(per_step / dit.step_s, 3)
    return rows


def count_only(preset_name: str, size: str, *, cfg_scale: float, vae_every: int, lpips: bool | None,
               overrides: Sequence[str] = ()) -> dict[str, float]:
    """Per-image model FLOPs of the DMD step and its parts, counted on the meta device (any size, no
    memory): the two kinds of step, the cycle average, the DiT step of the same size, and components."""
    meta = torch.device("meta")
    with meta, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pretrained tensors loaded into meta params: no-ops
        b = DMDStep(preset_name, size, batch=1, device=meta, precision="fp32", cfg_scale=cfg_scale,
                    vae_every=vae_every, lpips=lpips, seed=0, overrides=overrides)
    b.ctx.finite_or_skip = lambda loss: True  # a meta tensor has no value to read
    vae_step, other_step = count_flops(b.step), count_flops(b.step)
    latent, nc = b.latent, b.num_classes
    img = b.img_pool[:1]
    with torch.no_grad():
        enc = count_flops(lambda: b.tok.encode(img))
        dec = count_flops(lambda: b.tok.decode(torch.zeros(1, *latent, device=meta)))
    out = {"vae_turn_step": vae_step, "fake_only_step": other_step,
           "cycle_avg_step": (vae_step + (vae_every - 1) * other_step) / vae_every,
           "dit_train_step": bench_dit.dit_flops(size, 1, latent, nc),
           "dm_score_passes": 2 * bench_dit.dit_flops(size, 1, latent, nc, train=False, cfg=cfg_scale > 1),
           "encoder_fwd": enc, "decoder_fwd": dec}
    if b.rloss.lpips_module is not None:
        with torch.no_grad():
            out["lpips_fwd_pair"] = count_flops(lambda: b.rloss.lpips_module(img, img))
    with torch.no_grad():
        out["disc_fwd"] = count_flops(lambda: b.disc(img))
    print(f"DMD step FLOPs per image ({preset_name}, score nets {size}, CFG {cfg_scale:g}, k={vae_every}):")
    print("| part | GFLOP/img |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v / 1e9:.1f} |")
    out["ratio_cycle_to_dit"] = out["cycle_avg_step"] / out["dit_train_step"]
    print(f"| FLOP ratio (cycle average / DiT step) | {out['ratio_cycle_to_dit']:.2f} |")
    return out


def cfg_classes(preset_name: str) -> int:
    return preset(preset_name).data.num_classes


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="tokenizer / data preset: smoke (CPU default), fmnist, imagenet256 "
                                                  "(CUDA default)")
    p.add_argument("--size", default=None, help="score-net size (default: tiny on CPU, L on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch per step (default: 8 on CPU, 32 on CUDA: the paper's 256 over 8 GPUs)")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="CFG on both scores in the DM loss (1 = off)")
    p.add_argument("--vae-every", type=int, default=5, help="k: a VAE turn every k steps (App. A.3)")
    p.add_argument("--lpips", default=None, choices=["on", "off"], help="LPIPS term (default: as the preset)")
    p.add_argument("--no-dit", action="store_true", help="skip the DiT-step reference row")
    p.add_argument("--no-count", action="store_true", help="skip the FLOP-counting cycle")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more preset overrides")
    p.add_argument("--count-only", action="store_true", help="FLOPs per image on the meta device, no timing")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps counts whole cycles and must be >= 1")
    device = setup(args)
    cuda = device.type == "cuda"
    preset_name = args.preset or ("imagenet256" if cuda or args.count_only else "smoke")
    size = args.size or ("L" if cuda or args.count_only else "tiny")
    lpips = None if args.lpips is None else args.lpips == "on"
    if args.count_only:
        return {"flops": count_only(preset_name, size, cfg_scale=args.cfg_scale, vae_every=args.vae_every,
                                    lpips=lpips, overrides=args.set)}
    batch = args.batch or (32 if cuda else 8)
    peak = matmul_peak(device, args.peak_n)
    rows = measure(preset_name, size, batch=batch, device=device, precision=args.precision, cfg_scale=args.cfg_scale,
                   vae_every=args.vae_every, lpips=lpips,
                   compile=args.compile, seed=args.seed, steps=args.steps, warmup=args.warmup, peak=peak,
                   count=not args.no_count, with_dit=not args.no_dit, overrides=args.set)
    return report(rows, device=device, peak_tflops=peak, json_path=args.json,
                  argv=argv if argv is not None else sys.argv[1:],
                  notes={"steps": "timed cycles of vae_every steps", "score_nets": "random init, same FLOPs"})


if __name__ == "__main__":
    main()
