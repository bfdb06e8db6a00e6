"""Stage 2 (Sec. 4, Sec. 3.2): the prior's reference set, extracted, reduced and cached.

Feature extraction is sharded: worker r computes shards r, r + N, ... of the image set, each shard
written atomically, so N Ray Train workers extract N times faster and a killed extraction resumes at
the missing shards. The reduction and standardisation then run once, on rank 0."""

from __future__ import annotations

from typing import Any

import torch

from dmvae_study.config import ExperimentConfig
from trainers import artifacts
from trainers.common import StageContext, as_experiment


def baseline_encoder(cfg: ExperimentConfig, device: torch.device):
    """The study's beta-VAE baseline encoder (the LDM tokenizer of the ldm_noise prior)."""
    from dmvae_study.build import load_tokenizer
    tok = load_tokenizer(artifacts.tokenizer(cfg, "beta_vae"), device)
    return torch.no_grad()(lambda img: tok.encode(img.to(device)))


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    from priors import BuildContext, build_reference
    cfg, extras = as_experiment(config)
    art = artifacts.reference(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "reference", extras)
    if ctx.is_main:
        art.write_config(artifacts.reference_key(cfg))
    enc = baseline_encoder(cfg, ctx.device) if cfg.prior.name == "ldm_noise" and \
        cfg.prior.ldm_source == "baseline_vae" else None
    ref = build_reference(BuildContext(cfg=cfg, device=ctx.device, rank=ctx.rank, world=ctx.world, art=art,
                                       baseline_encoder=enc, progress=ctx.is_main))
    summary = {"count": len(ref), "shape": list(ref.sample_shape), "num_classes": ref.num_classes,
               **{k: v for k, v in ref.provenance.items() if isinstance(v, (int, float, str, bool))}}
    if ctx.is_main:
        art.mark_done(summary)
    ctx.barrier()
    return summary
