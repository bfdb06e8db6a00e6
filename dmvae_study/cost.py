"""Cost model of a study: steps, images and estimated GPU-hours per stage and row (`--dry-run`).

FLOPs are counted, not guessed: every network is built on the meta device at its configured shape and
run through `torch.utils.flop_counter` for one image (a training step costs 3x its forward: forward,
backward to activations, backward to weights). Time on one H100 = FLOPs / (989 TFLOP/s bf16 dense x
`MFU`), with MFU an assumption (0.35, typical of DiT training at these sizes) until a lent GPU
measures it (BENCHMARKS.md); LPIPS and the FID extractors use their published FLOP counts. Nothing here
touches Ray, data or weights.
"""

from __future__ import annotations

import functools
import json
import warnings
import torch

from dmvae_study.config import ExperimentConfig, latent_shape
from dmvae_study.pipeline import artifact, plan

H100_BF16_FLOPS = 989e12   # dense bf16 peak of one H100 SXM
MFU = 0.35                 # assumed model-FLOP utilisation
LPIPS_VGG_224 = 2 * 15.5e9  # VGG16 features at 224 px (15.5 GMACs), per image
EXTRACTOR_FLOPS = {"inception": 2 * 5.7e9, "lite0": 2 * 0.4e9}  # per image at their input size


def train_images(cfg: ExperimentConfig) -> int:
    """Training-set size without reading data: `data.train_limit`, else Fashion-MNIST's 60,000, else
    ImageNet-1k's 1,281,167 for a folder (an assumption for other folders)."""
    if cfg.data.train_limit:
        return cfg.data.train_limit
    return {"fmnist": 60_000, "synthetic": 512}.get(cfg.data.dataset, 1_281_167)


def _count(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(*inputs)
    return float(fc.get_total_flops())


@functools.lru_cache(maxsize=64)
def _net_flops(cfg_json: str) -> dict[str, float]:
    """Forward FLOPs per image of the row's encoder, decoder, discriminator and score / stage-2 DiTs."""
    from dmvae_study.build import build_dit, build_tokenizer
    cfg = ExperimentConfig.from_dict(json.loads(cfg_json))
    cfg = cfg.replace(run=cfg.run.replace(allow_random_weights=True))  # shapes only: no weights needed
    r = cfg.data.resolution
    c, h, w = latent_shape(cfg)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        import logging
        logging.disable(logging.WARNING)
        try:
            tok = build_tokenizer(cfg, "ae", device="meta")
            from dmvae_study.models.discriminator import NLayerDiscriminator
            disc = NLayerDiscriminator(3, max(16, cfg.tokenizer.decoder_ch // 2), cfg.tokenizer.disc_layers)
            img, z = torch.zeros(1, 3, r, r), torch.zeros(1, c, h, w)
            out = {"enc": _count(tok.encoder, img), "dec": _count(tok.decoder, z), "disc": _count(disc, img)}
            # a frozen backbone's features come from the feature cache in the tokenizer stage (trainers/frozen.py)
            out["proj"] = out["enc"] - _count(tok.encoder.backbone, img) if tok.encoder.backbone_frozen else out["enc"]
            t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
            for name, sec in (("teacher", cfg.teacher), ("generator", cfg.generator)):
                out[name] = _count(build_dit(sec, (cfg.prior.reduced_dim if name == "teacher" else c, h, w),
                                             cfg.data.num_classes), torch.zeros(1, cfg.prior.reduced_dim
                                             if name == "teacher" else c, h, w), t, y)
        finally:
            logging.disable(logging.NOTSET)
    out["lpips"] = LPIPS_VGG_224 * (r / 224) ** 2 if cfg.tokenizer.lpips_weight > 0 else 0.0
    return out


def stage_cost(cfg: ExperimentConfig, stage: str) -> dict[str, float]:
    """`{"steps", "images", "flops"}` of one stage of a (resolved) row."""
    f = _net_flops(json.dumps(cfg.to_dict(), sort_keys=True))
    enc_train = 1.0 if cfg.tokenizer.freeze_backbone and cfg.tokenizer.backbone not in ("small_conv", "ldm_conv") else 3.0
    recon = f["enc"] * enc_train + 3 * f["dec"] + 3 * f["lpips"] + 3 * 3 * f["disc"]  # G, D (real + fake), bCR
    if stage == "tokenizer":  # a frozen backbone: once per image and flip (the feature cache every seed shares,
        # counted here with each tokenizer that reads it), then the projector, decoder and discriminator per step
        if f["proj"] != f["enc"]:
            n = cfg.tokenizer.total_steps * cfg.tokenizer.batch_size
            cache = 2 * train_images(cfg) * (f["enc"] - f["proj"])
            return {"steps": cfg.tokenizer.total_steps, "images": n,
                    "flops": cache + n * (f["proj"] * 3 + 3 * f["dec"] + 3 * f["lpips"] + 9 * f["disc"])}
        n = cfg.tokenizer.total_steps * cfg.tokenizer.batch_size
        return {"steps": cfg.tokenizer.total_steps, "images": n, "flops": n * recon}
    if stage == "reference":
        n = min(cfg.prior.num_samples or train_images(cfg), train_images(cfg)) * (
            2 if cfg.prior.reduction == "tokenizer" and cfg.prior.tokenizer_flips else 1)
        return {"steps": 0, "images": n, "flops": n * f["enc"]}
    if stage in ("teacher", "generator"):
        sec = getattr(cfg, stage)
        n = sec.total_steps * sec.batch_size
        flops = 3 * n * f[stage]
        if stage == "generator" and sec.eval_every and sec.curve_samples:  # the gFID-vs-step curve (Fig. 8)
            ev = cfg.eval
            points = sec.total_steps // sec.eval_every
            flops += points * sec.curve_samples * (ev.sampler_steps * (2 if ev.cfg_scale > 1 else 1) * f["generator"]
                                                   + f["dec"] + EXTRACTOR_FLOPS[ev.extractor])
        return {"steps": sec.total_steps, "images": n, "flops": flops}
    if stage == "dmd":
        d = cfg.dmd
        n = d.total_steps * d.batch_size
        guided = 2 if d.cfg_scale > 1 else 1
        per = 3 * f["teacher"] + (3 * f["enc"] + 3 * f["dec"] + 3 * f["lpips"] + 9 * f["disc"]
                                   + 2 * guided * f["teacher"]) / d.vae_every + (1 - 1 / d.vae_every) * f["enc"]
        return {"steps": d.total_steps, "images": n, "flops": n * per}
    if stage == "refine":
        n = cfg.refine.total_steps * cfg.refine.batch_size
        return {"steps": cfg.refine.total_steps, "images": n, "flops": n * (f["enc"] + 3 * f["dec"] + 3 * f["lpips"]
                                                                             + 9 * f["disc"])}
    if stage == "latents":
        n = train_images(cfg) * (2 if cfg.generator.flip_cache else 1)
        return {"steps": 0, "images": n, "flops": n * f["enc"]}
    if stage == "eval":
        ev = cfg.eval
        ext = EXTRACTOR_FLOPS[ev.extractor]
        guided = 2 if ev.cfg_scale > 1 else 1
        flops = ev.rfid_images * (f["enc"] + f["dec"] + 2 * ext) + ev.gfid_samples * (
            ev.sampler_steps * guided * f["generator"] + f["dec"] + ext)
        return {"steps": 0, "images": ev.rfid_images + ev.gfid_samples, "flops": flops}
    raise ValueError(f"no cost model for stage {stage!r}")


def gpu_hours(flops: float) -> float:
    return flops / (H100_BF16_FLOPS * MFU) / 3600.0


# One CPU core: the 1-thread fp32 matmul probe read 0.12-0.16 TFLOP/s on an earlier development machine and the
# stages' steps reached 8-47% of it (BENCHMARKS.md "This machine"); 0.14 TFLOP/s at an assumed 25%. On the AMD
# EPYC of stop 43 the probe reads 0.09-0.10 and the mini study's stages ran at 21-64 GFLOP/s per core
# (`benchmarks/study_budget.py`), so 35 GFLOP/s stays a fair guess.
CPU_CORE_FLOPS = 0.14e12 * 0.25


def hours(flops: float, use_gpu: bool) -> float:
    """Estimated H100-hours (`use_gpu`) or CPU core-hours of `flops`: the unit a `--budget` is given in."""
    return gpu_hours(flops) if use_gpu else flops / CPU_CORE_FLOPS / 3600.0


def dry_run_report(rows: dict[str, ExperimentConfig]) -> str:
    """The plan of every row: stages, which artifacts are reused, steps, images and estimated H100-hours
    (rows with `run.use_gpu`) or CPU core-hours (CPU presets)."""
    lines, total, seen = [], 0.0, set()
    gpu = all(c.run.use_gpu for c in rows.values())
    unit = "H100-h" if gpu else "core-h"
    for label, cfg in rows.items():
        lines.append(f"row {label} (prior {cfg.prior.name}, seed {cfg.run.seed}):")
        for stage in plan(cfg):
            art = artifact(cfg, stage)
            shared = art.path in seen
            seen.add(art.path)
            c = stage_cost(cfg, stage)
            state = "reused (finished)" if art.done else ("shared with a row above" if shared else "to train")
            h = 0.0 if art.done or shared else hours(c["flops"], gpu)
            total += h
            lines.append(f"  {stage:10s} {state:24s} steps {c['steps']:>9,}  images {c['images']:>13,.0f}  "
                         f"~{h:9.2f} {unit}   {art.path.name}")
    if gpu:
        lines.append(f"total to train: ~{total:.1f} H100-hours ({total / 8:.1f} h on 8 GPUs at perfect scaling); "
                     f"FLOPs counted per network, time at an assumed {MFU:.0%} MFU of {H100_BF16_FLOPS / 1e12:.0f} "
                     f"TFLOP/s bf16 (dmvae_study/cost.py)")
    else:
        lines.append(f"total to train: ~{total:.1f} CPU core-hours; FLOPs counted per network, time at an assumed "
                     f"{CPU_CORE_FLOPS / 1e9:.0f} GFLOP/s per core (dmvae_study/cost.py; a rough guide: measured "
                     f"stage times are in BENCHMARKS.md)")
    return "\n".join(lines)


__all__ = ["CPU_CORE_FLOPS", "MFU", "dry_run_report", "gpu_hours", "hours", "stage_cost"]
