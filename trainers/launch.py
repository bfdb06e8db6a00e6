"""Run the stages of one study row, in-process or on N Ray Train workers.

All stages of a row run inside ONE worker group (`pipeline_loop` is the Ray Train
`train_loop_per_worker`): Ray Train start-up (tens of seconds here) is paid once per row, not once
per stage. Every stage resumes from its own checkpoints in the artifact store, so a worker loss
(Ray `FailureConfig` restarts the group) or a rerun of the same command repeats no finished work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from dmvae_study.config import ExperimentConfig
from dmvae_study.store import atomic_write_text
from trainers import artifacts
from trainers.common import as_experiment

log = logging.getLogger("dmvae_study")

STAGE_ORDER = ("tokenizer", "reference", "teacher", "dmd", "refine", "generator", "eval")


def _stage_fns() -> dict[str, Callable[[Any], dict]]:
    from trainers import dmd, evaluate, generator, reference, refine, teacher, tokenizer
    return {"tokenizer": tokenizer.train_loop, "reference": reference.train_loop, "teacher": teacher.train_loop,
            "dmd": dmd.train_loop, "refine": refine.train_loop, "generator": generator.train_loop,
            "eval": evaluate.train_loop}


def stages_for(cfg: ExperimentConfig) -> list[str]:
    """Stages a row needs: baselines skip the reference / teacher / DMD / refinement stages."""
    if cfg.prior.name in artifacts.BASELINE_ROWS:
        return ["tokenizer", "generator", "eval"]
    return list(STAGE_ORDER)


def pipeline_loop(config: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function (or in-process call): run the requested stages in order."""
    cfg, extras = as_experiment(config)
    stages = extras.get("stages") or stages_for(cfg)
    fns = _stage_fns()
    results: dict[str, Any] = {}
    for name in stages:
        if name == "reference" and cfg.prior.name == "ldm_noise" and cfg.prior.ldm_source == "baseline_vae":
            vae_cfg = cfg.replace(prior=cfg.prior.replace(name="vae"))  # the LDM whose noisy latents form the prior
            with _exclusive(artifacts.tokenizer(vae_cfg)):
                fns["tokenizer"]({**_as_dict(vae_cfg), **extras})
        t0 = time.time()
        with _exclusive(ARTIFACT_OF[name](cfg)):
            results[name] = dict(fns[name]({**_as_dict(cfg), **extras}) or {})
        results[name].setdefault("wall_s", round(time.time() - t0, 2))  # a reused stage keeps its own
    flat = {f"{s}/{k}": v for s, r in results.items() for k, v in (r or {}).items()
            if isinstance(v, (int, float, str)) or v is None}
    if extras.get("ray"):
        import ray.train
        ray.train.report({k: v for k, v in flat.items() if isinstance(v, (int, float))})
    return results


@contextlib.contextmanager
def _exclusive(art):
    """Rank 0 of this worker group holds the artifact's lock while the group runs the stage; the other
    ranks wait at a barrier until it has it, so two trials never build one artifact at once."""
    import torch.distributed as dist
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if multi else 0
    with art.lock() if rank == 0 else contextlib.nullcontext():
        if multi:
            dist.barrier()
        yield
        if multi:
            dist.barrier()


def _as_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"experiment": cfg.to_dict()}


def run_pipeline(cfg: ExperimentConfig, stages: list[str] | None = None, force_ray: bool = False,
                 name: str | None = None) -> dict[str, Any]:
    """Run a row's stages: in this process when one worker suffices, else on a Ray Train group.

    Returns the per-stage summaries (read back from the artifact store after a Ray run).
    """
    if cfg.run.num_workers == 1 and not force_ray:
        return pipeline_loop({**_as_dict(cfg), "stages": stages})
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = os.path.abspath(os.path.join(cfg.run.out_dir, cfg.run.name, "ray"))
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        pipeline_loop,
        train_loop_config={**_as_dict(cfg), "stages": stages, "ray": True},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or f"{cfg.run.name}-{cfg.prior.name}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
    )
    trainer.fit()
    return collect(cfg, stages)


ARTIFACT_OF = {"tokenizer": artifacts.tokenizer, "reference": artifacts.reference, "teacher": artifacts.teacher,
               "dmd": artifacts.dmd, "refine": artifacts.refine, "generator": artifacts.generator,
               "latents": artifacts.latents, "eval": artifacts.evaluation}


def collect(cfg: ExperimentConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """Per-stage summaries of a row, read from the DONE markers in the artifact store."""
    return {s: ARTIFACT_OF[s](cfg).summary() for s in (stages or stages_for(cfg))}


def write_manifest(cfg: ExperimentConfig, row: str, results: dict[str, Any], wall_s: float) -> Path:
    """`<out>/<study>/rows/<row>.json`: the row's resolved config, stage summaries and artifact folders
    (relative to the study folder), everything a report needs without re-running anything."""
    root = Path(cfg.run.out_dir) / cfg.run.name
    stages = [s for s in (*stages_for(cfg), "latents") if s in ARTIFACT_OF]
    paths = {s: os.path.relpath(ARTIFACT_OF[s](cfg).path, root) for s in stages}
    blob = {"row": row, "prior": cfg.prior.name, "wall_s": wall_s, "config": cfg.to_dict(),
            "summaries": results, "artifacts": paths}
    return atomic_write_text(root / "rows" / f"{row}.json", json.dumps(blob, indent=1, default=str))
