"""How much of a row's gFID spread is sampling noise? Redraws a finished row's gFID samples with other
noise seeds (same generator, same tokenizer, same reference features) and reports the standard deviation
of gFID at the row's sample count and at subsets of it, next to the seed-to-seed spread of the study.

    python -m benchmarks.gfid_sampling_noise results/table1-mini --rows vae-s0,dinov2-s0 --draws 4

The training-seed spread (`report/seeds.csv`, `gfid_std`) holds both the sampling noise and the
training noise; when the sampling part is small, more samples per row buy little and more seeds are the
way to resolve a difference. Evaluation only: nothing is trained, the study folder is read, not written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from dmvae_study import metrics
from dmvae_study.build import build_dit, for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.pipeline import artifact, final_tokenizer
from dmvae_study.store import load_torch
from trainers.common import StageContext
from trainers.evaluate import Features, generate, reference_features


def draws(cfg: ExperimentConfig, offsets: list[int], subsets: list[int]) -> dict[int, list[float]]:
    """gFID of `cfg`'s generator for each noise offset, on the first `n` samples for each `n` in `subsets`
    (balanced labels cycle through the classes, so a prefix of a multiple of the class count is balanced)."""
    ctx = StageContext(cfg=cfg, stage="eval")
    tok = for_inference(load_tokenizer(artifact(cfg, final_tokenizer(cfg)), ctx.device))
    ext = Features(cfg.eval.extractor, cfg, ctx.device)
    shape = tuple(artifact(cfg, "latents").summary()["shape"])
    net = build_dit(cfg.generator, shape, cfg.data.num_classes).eval()
    net.load_state_dict(load_torch(artifact(cfg, "generator").file("generator.pt")))
    ref = reference_features(cfg, ext, ctx)
    out: dict[int, list[float]] = {n: [] for n in subsets}
    for off in offsets:
        feats = generate(cfg, ctx, net, tok, ext, max(subsets), shape, seed_offset=off)["features"]
        for n in subsets:
            out[n].append(metrics.fid_from_features(ref, feats[:n]))
        print(f"  offset {off}: " + ", ".join(f"gFID-{n} {out[n][-1]:.2f}" for n in subsets), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a finished study folder, e.g. results/table1-mini")
    p.add_argument("--rows", required=True, help="rows to redraw, e.g. vae-s0,dinov2-s0")
    p.add_argument("--draws", type=int, default=4, help="noise seeds per row (the study's own is 4242)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.study)
    report = {}
    for row in args.rows.split(","):
        cfg = ExperimentConfig.from_dict(json.loads((root / "rows" / f"{row}.json").read_text())["config"])
        n = cfg.eval.gfid_samples
        subsets = sorted({n // 4, n // 2, n})
        print(f"{row}: {args.draws} draws of {n} samples", flush=True)
        res = draws(cfg, [4242 + 1000 * k for k in range(args.draws)], subsets)
        report[row] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "values": v}
                       for m, v in res.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
