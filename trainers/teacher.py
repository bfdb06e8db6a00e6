"""Stage 3 (App. A.2): the reference (teacher) score model, a LightningDiT trained by flow
matching on a prior's reference set, class-conditional where the set has labels (label dropout
for CFG), with EMA. The final EMA weights and their fingerprint go to `teacher.pt`."""

from __future__ import annotations

from typing import Any

from dmvae_study.config import ExperimentConfig
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import save_torch
from trainers import artifacts
from trainers.common import StageContext, as_experiment
from trainers.flowfit import fit_flow_model
from dmvae_study.build import state_fingerprint


def train_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    cfg, extras = as_experiment(config)
    art = artifacts.teacher(cfg)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, "teacher", extras)
    if ctx.is_main:
        art.write_config(cfg.to_dict())
    ref = ReferenceSet.load(artifacts.reference(cfg))
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
