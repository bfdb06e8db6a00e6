"""bf16 autocast against fp32 on the `mini` preset's own stage steps, on this CPU, one thread, one process.

The paper's recipe trains in bf16 on GPUs (the trainers' `run.precision=auto` with `run.use_gpu`); the
`mini` study runs fp32 on CPU. A CPU with AVX512-BF16 (`lscpu`: avx512_bf16) runs a large bf16 matmul at
about twice the fp32 rate, so this asks what bf16 autocast (`run.precision=bf16`) buys each stage of a
`mini` trial. It changes what is computed (8 mantissa bits in the autocast ops), so it is a recipe
change, not a speed-up; the factors feed `benchmarks.study_budget --speedup` for the study-level what-if.

Each stage is the step function its trainer calls, built as the trainer builds it (real Lite0 weights):

- tokenizer (conv encoder): `trainers.tokenizer.step` of the beta-VAE and the VA-VAE (cached Lite0
  features for the VF loss), GAN off and on (the preset trains half its steps each way);
- tokenizer (Lite0 encoder): the same step on the frozen-feature cache;
- dmd: `trainers.dmd.step` over a `vae_every` cycle (`benchmarks.bench_dmd.DMDStep`);
- refine: `trainers.refine.step` (frozen encoder, decoder + PatchGAN);
- teacher / generator: the tiny DiT's training step (`benchmarks.bench_dit`, trainer mode);
- sampling: the SDE-50 sampler on the tiny DiT (stage 2's gFID curve, evaluation);
- latents / reference / evaluation's reconstructions: the folded Lite0 encoder (`build.for_inference`) at
  128 px. The FID features stay fp32 under `run.precision=bf16` (`trainers.evaluate.generate` extracts
  them outside the autocast), so the metric is the same function of the images either way.

fp32 and bf16 are timed in alternation (`--rounds` times each) and the median of each is kept, so a
shared machine's load falls on both alike. The process keeps freed memory as every stage does
(`trainers.common.keep_freed_memory`: autocast casts the weights afresh each step), and each step gets its
inputs in the layout the stage gives them: the cached Lite0 features NCHW, as the cache's loader stacks them.
Handed the folded encoder's channels_last output instead, the Lite0 tokenizer's bf16 step showed 1.0x where the
stage runs 1.65x faster (stop 44).

    python -m benchmarks.bench_bf16_cpu [--rounds 3] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

PRECISIONS = ("fp32", "bf16")


def _median_s(fn: Callable[[], Any], steps: int) -> float:
    from benchmarks.common import time_calls
    return statistics.median(time_calls(fn, torch.device("cpu"), warmup=1, repeats=steps))


def _cfg(prior: str, precision: str, **over: Any):
    from dmvae_study.pipeline import resolve
    from dmvae_study.presets import preset
    return resolve(preset("mini", {"run.precision": precision, "run.threads": 1, **over}), prior)


def tokenizer_step(prior: str, precision: str, gan: bool) -> Callable[[], None]:
    from trainers.common import StageContext
    from trainers.tokenizer import setup, step
    cfg = _cfg(prior, precision, **{"tokenizer.disc_start": 0 if gan else 10**9,
                                    "baseline.disc_start": 0 if gan else 10**9})
    s, _ = setup(StageContext(cfg=cfg, stage="tokenizer"))
    g = torch.Generator().manual_seed(0)
    img = torch.rand(cfg.tokenizer.batch_size, 3, 32, 32, generator=g) * 2 - 1
    # what the feature cache hands the step: the loader stacks per-image slices, so NCHW-contiguous (the folded
    # encoder returns channels_last)
    feats = s.frozen[1](img).contiguous() if s.frozen is not None else None
    i = [0]

    def run() -> None:
        step(s, i[0], img, feats)
        i[0] += 1
    return run


def refine_step(precision: str) -> Callable[[], None]:
    """`trainers.refine.step` on `trainers.refine.state_for` over the tokenizer stage's modules (`setup` itself
    loads a finished DMD artifact)."""
    from trainers.common import StageContext
    from trainers.refine import state_for, step
    from trainers.tokenizer import build_discriminator, setup
    cfg = _cfg("dinov2", precision)
    s, _ = setup(StageContext(cfg=cfg, stage="tokenizer"))
    st = state_for(StageContext(cfg=cfg, stage="refine"), s.tok, build_discriminator(cfg))
    img = torch.rand(cfg.refine.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    i = [0]

    def run() -> None:
        step(st, i[0], img)
        i[0] += 1
    return run


def dmd_cycle(precision: str) -> Callable[[], None]:
    from benchmarks.bench_dmd import DMDStep
    from dmvae_study.presets import preset
    d = preset("mini").dmd
    b = DMDStep("mini", "tiny", batch=d.batch_size, device=torch.device("cpu"), precision=precision,
                cfg_scale=d.cfg_scale, vae_every=d.vae_every, lpips=None, seed=0, dataset_size=20000)
    return b.cycle


def dit_step(precision: str) -> Callable[[], None]:
    from benchmarks.bench_dit import make_step
    from dmvae_study.presets import preset
    g = preset("mini").generator
    return make_step(g.size, batch=g.batch_size, latent=(8, 8, 8), num_classes=10, patch=1,
                     device=torch.device("cpu"), precision=precision, compile=False, grad_ckpt=False,
                     mode="trainer", dataset_size=20000, seed=0)


def sampling(precision: str) -> Callable[[], None]:
    from benchmarks.bench_dit import build_net
    from benchmarks.common import autocast
    from dmvae_study.presets import preset
    from dmvae_study.samplers import Sampler
    cfg = preset("mini")
    net = build_net(cfg.generator.size, (8, 8, 8), 10).eval().requires_grad_(False)
    sampler = Sampler(kind=cfg.eval.sampler, steps=cfg.eval.sampler_steps, cfg_scale=cfg.eval.cfg_scale)
    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(cfg.eval.batch_size, 8, 8, 8, generator=g), torch.randint(0, 10, (cfg.eval.batch_size,))

    @torch.inference_mode()
    def run() -> None:
        with autocast(torch.device("cpu"), precision):
            sampler(net, noise, y, generator=g)
    return run


def lite0_encode(precision: str) -> Callable[[], None]:
    """The folded Lite0 pass of the tokenizer's encoder at 128 px (latent cache, reference set, evaluation's
    reconstructions)."""
    from benchmarks.common import autocast
    from trainers.common import StageContext
    from trainers.tokenizer import setup
    s, _ = setup(StageContext(cfg=_cfg("dinov2", "fp32"), stage="tokenizer"))
    enc = s.frozen[1]
    x = torch.rand(128, 3, 32, 32) * 2 - 1

    @torch.no_grad()
    def run() -> None:
        with autocast(torch.device("cpu"), precision):
            enc(x)
    return run


# (label, images per call, builder(precision))
CASES: list[tuple[str, int, Callable[[str], Callable[[], None]]]] = [
    ("tokenizer beta-VAE, GAN off", 64, lambda p: tokenizer_step("vae", p, False)),
    ("tokenizer beta-VAE, GAN on", 64, lambda p: tokenizer_step("vae", p, True)),
    ("tokenizer VA-VAE, GAN off", 64, lambda p: tokenizer_step("vavae", p, False)),
    ("tokenizer VA-VAE, GAN on", 64, lambda p: tokenizer_step("vavae", p, True)),
    ("tokenizer Lite0 (cached features), GAN off", 64, lambda p: tokenizer_step("dinov2", p, False)),
    ("tokenizer Lite0 (cached features), GAN on", 64, lambda p: tokenizer_step("dinov2", p, True)),
    ("DMD cycle (vae_every steps)", 64 * 5, dmd_cycle),
    ("refine step", 64, refine_step),
    ("tiny DiT training step", 128, dit_step),
    ("SDE-50 sampling, batch 100", 100, sampling),
    ("Lite0 encoder, folded, 128 px", 128, lite0_encode),
]

# `benchmarks.study_budget` group -> the cases whose summed per-call times price it (one call each: the
# preset's GAN-off and GAN-on halves, the beta-VAE and the VA-VAE weigh alike). Stage 2's gFID curve and
# evaluation are priced by their dominant part (the DiT step; the sampler); the conv encoder's latent cache
# (~3 core-min of the study) is left at 1.
GROUPS: dict[str, tuple[str, ...]] = {
    "tokenizer (conv encoder)": ("tokenizer beta-VAE, GAN off", "tokenizer beta-VAE, GAN on",
                                 "tokenizer VA-VAE, GAN off", "tokenizer VA-VAE, GAN on"),
    "tokenizer (Lite0 encoder)": ("tokenizer Lite0 (cached features), GAN off",
                                  "tokenizer Lite0 (cached features), GAN on"),
    "dmd": ("DMD cycle (vae_every steps)",),
    "refine": ("refine step",),
    "teacher": ("tiny DiT training step",),
    "generator": ("tiny DiT training step",),
    "eval (Lite0 encoder)": ("SDE-50 sampling, batch 100",),
    "eval (conv encoder)": ("SDE-50 sampling, batch 100",),
    "latents (Lite0 encoder)": ("Lite0 encoder, folded, 128 px",),
    "reference": ("Lite0 encoder, folded, 128 px",),
}


def group_factors(med: dict[str, dict[str, float]]) -> dict[str, float]:
    """fp32 time / bf16 time of each study_budget group, from the cases measured (`med[case][precision]`)."""
    out = {}
    for g, cases in GROUPS.items():
        have = [c for c in cases if c in med]
        if have:
            out[g] = sum(med[c]["fp32"] for c in have) / sum(med[c]["bf16"] for c in have)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternations of fp32 and bf16 per case")
    ap.add_argument("--steps", type=int, default=3, help="timed calls per round (after one warm-up call)")
    ap.add_argument("--only", default="", help="comma list of substrings of case labels to run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from trainers.common import keep_freed_memory
    kept = keep_freed_memory()  # as every stage's preamble (`run.keep_freed_memory`): autocast's per-step weight
    # casts are fresh tensors, and without it each one is a zero-filled mmap (BENCHMARKS.md, "Page faults")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"CPU avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}; amx_bf16: "
          f"{'yes' if 'amx_bf16' in flags else 'no'}; torch {torch.__version__}; 1 thread; glibc keeps freed memory: "
          f"{'yes' if kept else 'no'}")
    only = [o for o in args.only.split(",") if o]
    rows, med = [], {}
    print("| stage step | fp32 img/s | bf16 img/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for label, images, build in CASES:
        if only and not any(o in label for o in only):
            continue
        fns = {p: build(p) for p in PRECISIONS}
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(args.rounds):
            for p in PRECISIONS:
                times[p].append(_median_s(fns[p], args.steps))
        med[label] = {p: statistics.median(times[p]) for p in PRECISIONS}
        row = {"case": label, "fp32_img_s": images / med[label]["fp32"], "bf16_img_s": images / med[label]["bf16"],
               "factor": med[label]["fp32"] / med[label]["bf16"]}
        rows.append(row)
        print(f"| {label} | {row['fp32_img_s']:.0f} | {row['bf16_img_s']:.0f} | {row['factor']:.2f} |", flush=True)
        del fns
    factors = group_factors(med)
    print("\nstudy-level what-if (time / factor per stage group):\n  python -m benchmarks.study_budget <study> "
          "--speedup '" + ",".join(f"{g}={f:.2f}" for g, f in factors.items()) + "'")
    out = {"cases": rows, "speedup": factors}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
