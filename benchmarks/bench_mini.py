"""The miniature study's CPU speed-ups, each measured against its own "before" in one process (so the
ratio holds on a shared machine even when the absolute times do not).

1. Frozen-feature cache (`trainers/frozen.py`): the tokenizer pretraining step of the `mini` preset
   (frozen EfficientNet-Lite0 block 10 at 128 px + MLP projector + conv decoder + PatchGAN) computing
   the backbone every step, against the same step reading cached features (what the stage does).
2. Lite0 inference (`build.for_inference`, the backbone's channels_last): the frozen backbone as the
   training module holds it (BatchNorm unfused, contiguous NCHW) against BatchNorm folded + channels_last,
   for every encode-only pass (feature cache, reference set, latent cache, evaluation).

    python -m benchmarks.bench_mini [--threads 2] [--steps 5] [--batch 64]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _median_s(fn, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dmvae_study.presets import preset
    from dmvae_study.pipeline import resolve
    from trainers.common import StageContext
    from trainers.tokenizer import setup, step
    cfg = resolve(preset("mini", {"tokenizer.batch_size": args.batch, "tokenizer.disc_start": 0}), "dinov2")
    ctx = StageContext(cfg=cfg, stage="tokenizer")
    s, _ = setup(ctx)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1
    _, encode, _ = s.frozen
    feats = encode(img)
    i = [0]

    def live():
        step(s, i[0], img)
        i[0] += 1

    def cached():
        step(s, i[0], img, feats)
        i[0] += 1
    t_live, t_cached = _median_s(live, args.steps), _median_s(cached, args.steps)
    bb = s.tok.encoder.backbone
    plain = copy.deepcopy(bb).eval()
    plain.features = type(plain).features.__get__(plain)  # the training module's own forward

    def nchw(x: torch.Tensor) -> torch.Tensor:  # the pre-change layout: NCHW, BatchNorm unfused
        net = plain.net
        x = net._swish(net._bn0(net._conv_stem(plain.normalize(plain.resize(x)).contiguous())))
        for block in net._blocks[: plain.block + 1]:
            x = block(x, drop_connect_rate=0.0)
        return x
    big = torch.rand(128, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        t_nchw = _median_s(lambda: nchw(big), args.steps)
        t_unfused_cl = _median_s(lambda: plain(big), args.steps)
        t_folded = _median_s(lambda: encode(big), args.steps)
    rows = [
        ("tokenizer step, backbone every step", args.batch / t_live, "1.00"),
        ("tokenizer step, cached frozen features", args.batch / t_cached, f"{t_live / t_cached:.2f}"),
        ("Lite0 block10 @128 px, NCHW, BatchNorm unfused", 128 / t_nchw, "1.00"),
        ("  + channels_last", 128 / t_unfused_cl, f"{t_nchw / t_unfused_cl:.2f}"),
        ("  + BatchNorm folded (for_inference)", 128 / t_folded, f"{t_nchw / t_folded:.2f}"),
    ]
    print(f"| measurement ({args.threads} threads) | img/s | factor |\n|---|---|---|")
    for name, rate, f in rows:
        print(f"| {name} | {rate:.0f} | {f} |")
    return {name: rate for name, rate, _ in rows}


if __name__ == "__main__":
    main()
