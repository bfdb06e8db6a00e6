"""Run the stages of one study row, in-process or on N Ray Train workers.

All stages of a row run inside ONE worker group (`pipeline_loop` is the Ray Train
`train_loop_per_worker`): Ray Train start-up (tens of seconds here) is paid once per row, not once
per stage. The stage table (`dmvae_study.pipeline.STAGES`) says what runs; before a stage, every
artifact it consumes is built if missing (a prior's declared needs included), each under an
exclusive lock so two trials never build one artifact at once. Every stage resumes from its own
checkpoints, so a worker loss (Ray `FailureConfig` restarts the group) or a rerun repeats no
finished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dmvae_study.config import ExperimentConfig
from dmvae_study.pipeline import STAGES, LaunchOptions, artifact, derived, plan, resolve
from dmvae_study.store import ArtifactDir, atomic_write_text
from trainers.common import run_stage

log = logging.getLogger("dmvae_study")


def ensure(stage: str, cfg: ExperimentConfig, opts: LaunchOptions, results: dict[str, Any] | None = None) -> dict:
    """Build `stage` for this config after everything it consumes; a finished artifact is reused."""
    for st, c in STAGES[stage].inputs(cfg).values():
        if not artifact(c, st).done:
            ensure(st, c, opts)
    art = artifact(cfg, stage)
    t0 = time.time()
    try:
        with _exclusive(art):
            out = dict(run_stage(stage, cfg, opts) or {})
    except Exception as e:  # the study's failure summary names the stage
        if not hasattr(e, "dmvae_stage"):
            e.dmvae_stage = stage  # type: ignore[attr-defined]
            log.error("[%s] stage %s failed: %s: %s", opts.row or cfg.prior.name, stage, type(e).__name__, e)
        raise
    out.setdefault("wall_s", round(time.time() - t0, 2))  # a reused stage keeps its own
    if results is not None:
        results[stage] = out
    return out


def pipeline_loop(payload: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function (or in-process call): `{"experiment": config dict, "launch": options}`."""
    cfg = resolve(ExperimentConfig.from_dict(payload["experiment"]))
    opts = LaunchOptions(**payload.get("launch", {}))
    results: dict[str, Any] = {}
    with row_log(opts):
        for stage in plan(cfg, opts.stages):
            ensure(stage, cfg, opts, results)
    return results


@contextlib.contextmanager
def row_log(opts: LaunchOptions):
    """Append this process's `dmvae_study` log records and warnings (progress lines, random-init weights,
    skipped images, resumed-from-step) to the row's log file, rank 0 only."""
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not opts.log_file or rank:
        yield
        return
    Path(opts.log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(opts.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    loggers = [logging.getLogger(n) for n in ("dmvae_study", "priors", "py.warnings")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(lv)
        handler.close()


@contextlib.contextmanager
def _exclusive(art: ArtifactDir):
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


def run_pipeline(cfg: ExperimentConfig, stages: list[str] | None = None, force_ray: bool = False,
                 opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Run a (resolved) row's stages: in this process when one worker suffices, else on a Ray Train group.

    Returns the per-stage summaries (read back from the artifact store after a Ray run)."""
    opts = dataclasses.replace(opts or LaunchOptions(), stages=tuple(stages) if stages else None)
    cfg = resolve(cfg)
    if cfg.run.num_workers == 1 and not force_ray:
        return pipeline_loop({"experiment": cfg.to_dict(), "launch": dataclasses.asdict(opts)})

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = os.path.abspath(os.path.join(cfg.run.out_dir, cfg.run.name, "ray"))
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})}
    callbacks = []
    if opts.report == "tune":  # inside a Tune trial: Ray Train's per-interval reports reach the trial
        from ray.tune.integration.ray_train import TuneReportCallback
        callbacks.append(TuneReportCallback())
    worker_opts = dataclasses.replace(opts, ray=True, report="train")
    trainer = TorchTrainer(
        pipeline_loop,
        train_loop_config={"experiment": cfg.to_dict(), "launch": dataclasses.asdict(worker_opts)},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo",
                                 timeout_s=int(cfg.run.pg_timeout_s)),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{cfg.run.name}-{opts.row or cfg.prior.name}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures), callbacks=callbacks),
    )
    trainer.fit()
    return collect(cfg, stages)


def collect(cfg: ExperimentConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """Per-stage summaries of a row, read from the DONE markers in the artifact store."""
    return {s: artifact(cfg, s).summary() for s in plan(cfg, stages)}


def write_manifest(cfg: ExperimentConfig, row: str, results: dict[str, Any], wall_s: float,
                   extra: dict[str, Any] | None = None) -> Path:
    """`<out>/<study>/rows/<row>.json`: the row's resolved config, the values the study derived for it,
    stage summaries and artifact folders (relative to the study folder): what a report needs. First
    the row's archive `rows/<row>/` (curves, grids, t-SNE inputs: `dmvae_study.report.archive`), so
    a committed manifest has what its figures need after the artifact store is gone."""
    from dmvae_study.report.archive import archive_row
    root = Path(cfg.run.out_dir) / cfg.run.name
    folders = {s: artifact(cfg, s).path for s in plan(cfg)}
    if on_disk := {s: p for s, p in folders.items() if p.exists()}:
        try:
            archive_row(root, row, on_disk)
        except Exception as e:  # the row's result stands; only figures rebuilt without the store lack it
            log.warning("row %s: its archive rows/%s/ was not written (%s: %s); the report draws its figures from "
                        "the artifact store while that exists (python -m dmvae_study.report.archive retries)",
                        row, row, type(e).__name__, e)
    paths = {s: os.path.relpath(p, root) for s, p in folders.items()}
    blob = {"row": row, "prior": cfg.prior.name, "seed": cfg.run.seed, "wall_s": wall_s, "derived": derived(cfg),
            "config": cfg.to_dict(), "summaries": results, "artifacts": paths, **(extra or {})}
    return atomic_write_text(root / "rows" / f"{row}.json", json.dumps(blob, indent=1, default=str))
