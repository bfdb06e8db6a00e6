"""Running a study on Ray Tune: the row driver of one trial, shared work before the trials, the Tune
experiment (resumed by rerunning the same command), failure reporting and the study tables.

Layering (Ray's documented pattern): Tune trial -> driver function `row_trial` -> `run_pipeline`,
which runs a row's stages in-process (one worker) or on a Ray Train TorchTrainer (several workers).
Every row arrives resolved and validated (`studies.common.prepare`); a trial runs its config unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from dmvae_study.config import ExperimentConfig
from dmvae_study.pipeline import LaunchOptions, derived
from dmvae_study.store import atomic_write_text
from studies.common import Study, done_records, stopped_record


def init_ray(address: str | None = None, keep_freed_memory: bool = True) -> None:
    """Connect to a cluster, or start a local one (dashboard off, bound to loopback). Worker output
    (one progress line per stage interval) reaches this console and `ray job logs`. `keep_freed_memory`
    (`run.keep_freed_memory`): the job's workers start with glibc's malloc keeping freed memory in one arena
    (`trainers.common.MALLOC_ENV`: a stage runs in a worker thread, whose arena only the startup
    environment can choose)."""
    import ray
    if ray.is_initialized():
        return
    from studies.resources import HEAD
    from trainers.common import MALLOC_ENV
    env = {"runtime_env": {"env_vars": dict(MALLOC_ENV)}} if keep_freed_memory else {}
    if address:
        ray.init(address=address, log_to_driver=True, **env)
    else:  # the local head also offers the `head` resource trial drivers reserve (studies/resources.py)
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True, resources={HEAD: 1},
                 _temp_dir=os.environ.get("RAY_TMPDIR"), **env)


def share_cpus(rows: dict[str, ExperimentConfig], multinode: bool) -> dict[str, ExperimentConfig]:
    """On one CPU machine, rows that run in-process share its cores: each of the rows that run at once gets
    `cores / concurrent` CPUs (and as many torch threads), so a lone row uses every core and two rows
    one core each, instead of a fixed 0.9 CPU per row. Not an artifact key: results do not depend on it."""
    import ray

    from studies.resources import in_process
    first = next(iter(rows.values()))
    if multinode or first.run.use_gpu or not in_process(first, multinode) or first.run.threads:
        return rows
    cores = int(ray.cluster_resources().get("CPU", 1))
    at_once = min(len(rows), first.run.max_concurrent_trials or len(rows), cores)
    per = max(1, cores // max(at_once, 1))
    return {k: c.replace(run=c.run.replace(cpus_per_worker=float(per))) for k, c in rows.items()}


# ---- one trial -----------------------------------------------------------------------------------------

def setup_logging() -> None:
    """INFO lines of the platform (progress, warnings) on stderr of this process."""
    import logging
    lg = logging.getLogger("dmvae_study")
    lg.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) for h in lg.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)


def row_trial(config: dict[str, Any]) -> None:
    """Tune trial driver: one row of a study (a prior, a point of an ablation grid, a seed)."""
    from ray import tune

    from trainers.launch import run_pipeline, write_manifest
    setup_logging()
    label = config["row"]
    cfg = ExperimentConfig.from_dict(config["rows"][label])
    root = Path(cfg.run.out_dir) / cfg.run.name
    opts = LaunchOptions(row=label, report="tune", log_file=str(root / "logs" / f"{label}.log"))
    t0 = time.time()
    failed = root / "rows" / f"{label}.failed.json"
    try:
        results = run_pipeline(cfg, opts=opts, force_ray=config.get("force_ray", False))
    except Exception as e:
        blob = {"row": label, "stage": getattr(e, "dmvae_stage", None), "error": f"{type(e).__name__}: {e}",
                "log": opts.log_file, "traceback": traceback.format_exc()}
        atomic_write_text(failed, json.dumps(blob, indent=1))
        raise
    failed.unlink(missing_ok=True)
    wall = time.time() - t0
    record = flatten_row(cfg, label, results, wall)
    write_manifest(cfg, label, results, wall, extra={"record": record})
    tune.report({**record, "row_done": 1})


def flatten_row(cfg: ExperimentConfig, row: str, results: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The table row: metrics named by extractor, the values the study derived for the row, cost."""
    ev = results.get("eval", {})
    tag = ev.get("extractor", cfg.eval.extractor)
    gpus = cfg.run.num_workers if cfg.run.use_gpu else 0
    d = derived(cfg)
    return {"row": row, "prior": cfg.prior.name, "seed": cfg.run.seed, "rfid": ev.get(f"rfid_{tag}"),
            "psnr": ev.get("psnr"), "gfid": ev.get(f"gfid_{tag}"), "is": ev.get(f"is_{tag}"), "extractor": tag,
            "gfid_samples": ev.get("gfid_samples"), "matching_swd": (results.get("dmd") or {}).get("match/swd"),
            "diversity": ev.get(f"diversity_{tag}"), "latent_diversity": ev.get("latent_diversity"),
            "dm_weight": d["dm_weight"], "cfg_scale": d["cfg_scale"], "timestep_schedule": d["timestep_schedule"],
            "score_net_size": d["score_net_size"], "reduction": d["reduction"], "stand_in": d["stand_in"],
            "wall_s": wall_s, "gpu_hours": wall_s * gpus / 3600.0, "random_init": bool(ev.get("random_init")),
            "status": "ok"}


# ---- the whole study ------------------------------------------------------------------------------------

def run_shared_work(study: Study) -> None:
    """Stages two or more rows need (the shared tokenizer, a beta-VAE that is also an LDM, a reference set
    and teacher shared by ablation points) run once, before the trials, so trials do not queue on locks."""
    import ray

    from dmvae_study.pipeline import shared_work
    from studies.resources import in_process, is_multinode
    from trainers.launch import ensure, run_pipeline
    setup_logging()
    multinode = is_multinode()
    cores = float(ray.cluster_resources().get("CPU", 1))
    for stage, cfg in shared_work(list(study.rows.values())):
        if in_process(cfg, multinode):  # alone on this machine: every core
            cfg = cfg if cfg.run.use_gpu or cfg.run.threads else cfg.replace(run=cfg.run.replace(cpus_per_worker=cores))
            ensure(stage, cfg, LaunchOptions(row="shared"))
        else:
            run_pipeline(cfg, stages=[stage], force_ray=True, opts=LaunchOptions(row="shared"))


def run_study(study: Study, stem: str, caption: str, scheduler: Any = None,
              trainable: Callable[[dict[str, Any]], None] | None = None) -> pd.DataFrame:
    """Shared work, then one Tune trial per row (resuming an interrupted study), then the tables.
    Any failed row: the table still lists it (status failed), a summary names row, stage, error and
    log, and the process exits non-zero. A row a `scheduler` stopped early is listed as `stopped`, not
    failed. `trainable` replaces the row driver `row_trial` (tests)."""
    done = done_records(study)
    if done:
        print(f"note: {len(done)} row(s) already done (their manifests hold the same config): "
              f"{', '.join(done)}; not run again", file=sys.stderr)
    todo = Study(study.name, study.root, study.base, {k: v for k, v in study.rows.items() if k not in done},
                 study.args)
    frames = [pd.DataFrame.from_records(list(done.values()))] if done else []
    if todo.rows:
        init_ray(study.args.address, all(c.run.keep_freed_memory for c in todo.rows.values()))
        if trainable is None:
            run_shared_work(todo)
        frames.append(run_tune(todo, scheduler=scheduler, trainable=trainable))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    order = [r for r in study.rows if r in set(df["row"])] if len(df) else []
    df = df.set_index("row").loc[order].reset_index() if len(df) else df
    show = write_tables(df, study.root, stem, caption)
    from dmvae_study.report.tables import markdown_table
    print(markdown_table(show))
    print(f"\nwrote {study.root}/{stem}.csv, .parquet, .md, .tex; report: python -m dmvae_study.report {study.root}")
    failed = df[~df["status"].isin(["ok", "stopped"])] if len(df) else df
    if len(failed):
        print(f"\n{len(failed)} row(s) failed or unfinished:", file=sys.stderr)
        val = lambda r, k: r[k] if isinstance(r.get(k), str) and r[k] else "?"  # NaN / None -> "?"
        for _, r in failed.iterrows():
            where = "unfinished" if r.get("status") == "unfinished" else f"stage {val(r, 'failed_stage')}"
            print(f"  {r['row']}: {where}: {val(r, 'error')}  (log: {val(r, 'log')})", file=sys.stderr)
        raise SystemExit(1)
    return df


def run_tune(study: Study, scheduler: Any = None,
             trainable: Callable[[dict[str, Any]], None] | None = None) -> pd.DataFrame:
    """One Tune trial per row; the same command resumes an interrupted study (`Tuner.restore`).
    `scheduler`: a Tune trial scheduler (the frontier study's per-prior ASHA; default FIFO); a row it
    stopped leaves `rows/<row>.stopped.json` and is recorded as `stopped`. `trainable` replaces the row
    driver `row_trial` (tests)."""
    from ray import tune

    from dmvae_study.store import config_digest
    from studies import resources
    multinode = resources.is_multinode()
    shared = share_cpus(study.rows, multinode)
    rows = {k: v.to_dict() for k, v in shared.items()}
    first = next(iter(shared.values()))
    trainable = tune.with_resources(trainable or row_trial, resources.trial_resources(first, multinode))
    # One Tune experiment per row set: rerunning the same command restores it; other rows or settings start
    # a new one (finished stages are still reused from the artifact store).
    path = study.root / f"tune-{config_digest({k: v.to_dict() for k, v in study.rows.items()}, 8)}"
    if study.args.restart and path.exists():
        shutil.rmtree(path)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"row": tune.grid_search(list(rows)), "rows": rows,
                                    "force_ray": not resources.in_process(first, multinode)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=resources.max_concurrency(first, len(rows), multinode), scheduler=scheduler),
            run_config=tune.RunConfig(name=path.name, storage_path=str(study.root), verbose=1,
                                      callbacks=tracking_callbacks(study.args),
                                      failure_config=tune.FailureConfig(max_failures=first.run.max_failures)))
    grid = tuner.fit()
    records = []
    for r in grid:
        label = r.config.get("row")
        stopped = stopped_record(study.root, label)
        if stopped and not r.error and not r.metrics.get("row_done"):
            records.append(stopped["record"])
            continue
        if r.error or not r.metrics.get("row_done"):
            records.append(failure_record(study.root, label, study.rows[label].prior.name, r.error))
            continue
        records.append({k: v for k, v in r.metrics.items() if not str(k).split("/")[0] in _STAGE_PREFIXES
                        and k != "row_done"})
    return pd.DataFrame.from_records(records)


_STAGE_PREFIXES = {"tokenizer", "reference", "teacher", "dmd", "refine", "latents", "generator", "eval",
                   "config", "time_this_iter_s", "time_total_s", "training_iteration"}


def failure_record(root: Path, label: str, prior: str, error: BaseException | None) -> dict[str, Any]:
    """The table row of a trial without a result: `failed` (it raised; stage, error and log from the
    `rows/<row>.failed.json` its driver wrote) or `unfinished` (no error: the study was stopped first)."""
    p = root / "rows" / f"{label}.failed.json"
    info = json.loads(p.read_text()) if error is not None and p.exists() else {}
    if error is None:
        msg = "the study stopped before this row finished (Ctrl-C or a lost driver); the same command resumes it"
    else:
        msg = info.get("error") or str(error)
    return {"row": label, "prior": prior, "status": "failed" if error is not None else "unfinished",
            "failed_stage": info.get("stage"), "error": msg,
            "log": info.get("log") or str(root / "logs" / f"{label}.log")}


def tracking_callbacks(args: argparse.Namespace) -> list:
    """MLflow / W&B loggers for Tune, only when asked for by flag (credentials from the environment)."""
    cbs = []
    if args.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        cbs.append(MLflowLoggerCallback(tracking_uri=args.mlflow, experiment_name="dmvae-study"))
    if args.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback
        cbs.append(WandbLoggerCallback(project=args.wandb))
    return cbs


def write_tables(df: pd.DataFrame, root: Path, stem: str, caption: str) -> pd.DataFrame:
    """The study table (`dmvae_study.report.tables.write_table_files`); returns the display frame."""
    from dmvae_study.report.tables import write_table_files
    return write_table_files(df, root, stem, caption)[0]
