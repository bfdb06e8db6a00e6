"""Stage 6 (App. A.5): a fresh LightningDiT on the final tokenizer's cached, normalised latents
(`trainers.latents`), with the gFID-vs-step curve of Fig. 8 every `generator.eval_every` steps."""

from __future__ import annotations

from typing import Any

import torch

from dmvae_study.build import load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.metrics import fid_from_features
from dmvae_study.pipeline import LaunchOptions, artifact, final_tokenizer
from dmvae_study.store import ArtifactDir, save_torch
from trainers.common import StageContext, run_stage
from trainers.flowfit import fit_flow_model
from trainers.latents import load_latents


def gfid_curve(ctx: StageContext, shape: tuple[int, ...]):
    """Callback for Fig. 8: every `generator.eval_every` steps, gFID of the current EMA net on
    min(eval.gfid_samples, generator.curve_samples) samples (logged as `eval/gfid_curve` by the main rank).
    Every rank calls it at the same steps (`loop_tail`) and samples its share of the batches; the first call
    also shares the extraction of the gFID reference, so no rank idles in a collective meanwhile."""
    cfg = ctx.cfg
    every = cfg.generator.eval_every
    if every <= 0:
        return None
    from trainers import evaluate
    state: dict = {}

    def on_log(step: int, ema: torch.nn.Module) -> dict:
        if step % every:
            return {}
        if not state:
            state["tok"] = load_tokenizer(artifact(cfg, final_tokenizer(cfg)), ctx.device)
            state["ext"] = evaluate.Features(cfg.eval.extractor, cfg, ctx.device)
            state["ref"] = evaluate.reference_features(cfg, state["ext"], ctx)
        n = min(cfg.eval.gfid_samples, cfg.generator.curve_samples)
        gen = evaluate.generate(cfg, ctx, ema.eval(), state["tok"], state["ext"], n, shape, seed_offset=step,
                                shared=True)
        if not ctx.is_main:
            return {}
        return {"eval/gfid_curve": fid_from_features(state["ref"], gen["features"]), "eval/gfid_curve_n": n}
    return on_log


def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg = ctx.cfg
    z, y = load_latents(cfg)
    ema, last = fit_flow_model(ctx, art, z, y, cfg.data.num_classes, cfg.generator,
                               on_log=gfid_curve(ctx, tuple(z.shape[1:])))
    summary = {"loss/fm": last.get("loss/fm"), "latent_shape": list(z.shape[1:]), "cached_latents": int(z.shape[0])}
    if ctx.is_main:
        save_torch(art.file("generator.pt"), ema.state_dict())
        art.mark_done(summary)
    ctx.barrier()
    return summary


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Train this row's stage-2 DiT (reused when its artifact is finished)."""
    return run_stage("generator", cfg, opts)
