"""Stage 3 (App. A.2): the reference (teacher) score model, a LightningDiT trained by flow
matching on a prior's reference set, class-conditional where the set has labels (label dropout
for CFG), with EMA. The final EMA weights and their fingerprint go to `teacher.pt`."""

from __future__ import annotations

from typing import Any

from dmvae_study.build import state_fingerprint
from dmvae_study.config import ExperimentConfig
from dmvae_study.pipeline import LaunchOptions, artifact
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import ArtifactDir, save_torch
from trainers.common import StageContext, run_stage
from trainers.flowfit import fit_flow_model


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg = ctx.cfg
    ref = ReferenceSet.load(artifact(cfg, "reference"))
    ema, last = fit_flow_model(ctx, art, ref.x, ref.y, ref.num_classes, cfg.teacher)
    summary = {"loss/fm": last.get("loss/fm"), "sample_shape": list(ref.sample_shape),
               "num_classes": ref.num_classes, "steps": cfg.teacher.total_steps}
    if ctx.is_main:
        state = ema.state_dict()
        save_torch(art.file("teacher.pt"), state)
        summary["fingerprint"] = state_fingerprint(state)
        art.mark_done(summary)
    ctx.barrier()
    return summary


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Train this row's teacher on its reference set (reused when its artifact is finished)."""
    return run_stage("teacher", cfg, opts)
