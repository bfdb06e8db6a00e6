"""Stage 2 (Sec. 4, Sec. 3.2): the prior's reference set, extracted, reduced and cached.

Feature extraction is sharded: worker r computes shards r, r + N, ... of the image set, each shard
written atomically, so N Ray Train workers extract N times faster and a killed extraction resumes at
the missing shards. The reduction and standardisation then run once, on rank 0. The artifacts the
prior declared it needs (`priors.register(needs=...)`: a tokenizer whose latents are the reference,
the LDM autoencoder of ldm_noise) were built before this stage by the runner."""

from __future__ import annotations

from typing import Any

from dmvae_study.config import ExperimentConfig
from dmvae_study.pipeline import STAGES, LaunchOptions, artifact
from dmvae_study.store import ArtifactDir
from trainers.common import StageContext, run_stage


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    from priors import BuildContext, build_reference
    cfg = ctx.cfg
    inputs = {label: artifact(c, st) for label, (st, c) in STAGES["reference"].inputs(cfg).items()}
    ref = build_reference(BuildContext(cfg=cfg, device=ctx.device, rank=ctx.rank, world=ctx.world, art=art,
                                       inputs=inputs, progress=ctx.is_main and not ctx.opts.ray
                                       and ctx.opts.report == "none"))
    summary = {"count": len(ref), "shape": list(ref.sample_shape), "num_classes": ref.num_classes,
               **{k: v for k, v in ref.provenance.items() if isinstance(v, (int, float, str, bool))}}
    if ctx.is_main:
        art.mark_done(summary)
    ctx.barrier()
    return summary


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Build this row's reference set (reused when its artifact is finished)."""
    return run_stage("reference", cfg, opts)
