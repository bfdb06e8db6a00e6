"""What the study scripts share: the CLI, Ray start-up, the Tune trial driver, and table output.

Layering (Ray's documented pattern): Tune trial -> driver function `row_trial` -> `run_pipeline`,
which runs a row's stages in-process (one worker) or on a Ray Train TorchTrainer (several workers).
Tune never receives a TorchTrainer directly (Ray Train V2 rejects that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from dmvae_study.config import PRESETS, ExperimentConfig, preset
from dmvae_study.configlib import ConfigError
from dmvae_study.store import atomic_write_text, preflight_writable

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="named preset (default: smoke)")
    p.add_argument("--out", default="results", help="results root; the study writes <out>/<study>/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable, e.g. --set dmd.dm_weight=20")
    p.add_argument("--restart", action="store_true", help="delete this study's results and start over")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    return p


def study_config(args: argparse.Namespace, name: str) -> ExperimentConfig:
    """The study's resolved config; a bad `--set` or an unusable `--out` ends the CLI with a one-line
    error (exit code 1, no traceback) before Ray starts or anything trains."""
    try:
        cfg = preset(args.preset, list(args.overrides) + [f"run.out_dir={args.out}", f"run.name={name}"])
        root = Path(args.out) / name
        if args.restart and root.exists():
            shutil.rmtree(root)
        preflight_writable(root)
    except (ConfigError, OSError) as e:  # PermissionError (read-only) and full disk are OSErrors
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {e}") from None
    return cfg


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster, or start a local one (dashboard off, bound to loopback)."""
    import ray
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
                 _temp_dir=os.environ.get("RAY_TMPDIR"))


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """A trial driver that runs in-process holds its worker's resources; one that launches a
    TorchTrainer holds almost nothing (its Train workers reserve CPUs/GPUs; on 2 cores a driver
    reserving a whole CPU starves its own workers)."""
    if cfg.run.num_workers == 1:
        return {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})}
    return {"CPU": 0.01}


def max_concurrency(cfg: ExperimentConfig) -> int:
    """Concurrent trials the cluster holds: GPUs (or CPUs) over what one trial's workers reserve."""
    if cfg.run.max_concurrent_trials:
        return cfg.run.max_concurrent_trials
    import ray
    res = ray.cluster_resources()
    if cfg.run.use_gpu:
        return max(int(res.get("GPU", 0) // cfg.run.num_workers), 1)
    return max(int(res.get("CPU", 1) // (cfg.run.num_workers * cfg.run.cpus_per_worker)), 1)


def row_trial(config: dict[str, Any]) -> None:
    """Tune trial driver: one row of a study (a prior, or a point of an ablation grid)."""
    from ray import tune

    from dmvae_study.configlib import apply_overrides
    from trainers.launch import run_pipeline, write_manifest
    cfg = apply_overrides(ExperimentConfig.from_dict(config["experiment"]), config["row_overrides"][config["row"]])
    t0 = time.time()
    results = run_pipeline(cfg, name=f"{cfg.run.name}-{config['row']}")
    wall = time.time() - t0
    write_manifest(cfg, config["row"], results, wall)
    tune.report(flatten_row(cfg, config["row"], results, wall))


def flatten_row(cfg: ExperimentConfig, row: str, results: dict[str, Any], wall_s: float) -> dict[str, Any]:
    ev = results.get("eval", {})
    tag = ev.get("extractor", cfg.eval.extractor)
    gpus = cfg.run.num_workers if cfg.run.use_gpu else 0
    return {"row": row, "prior": cfg.prior.name, "rfid": ev.get(f"rfid_{tag}"), "psnr": ev.get("psnr"),
            "gfid": ev.get(f"gfid_{tag}"), "is": ev.get(f"is_{tag}"), "extractor": tag,
            "gfid_samples": ev.get("gfid_samples"),
            "matching_swd": (results.get("dmd") or {}).get("match/swd"),
            "diversity": ev.get(f"diversity_{tag}"), "latent_diversity": ev.get("latent_diversity"),
            "wall_s": wall_s, "gpu_hours": wall_s * gpus / 3600.0, "random_init": bool(ev.get("random_init"))}


def run_tune(cfg: ExperimentConfig, rows: dict[str, dict[str, Any]], address: str | None) -> pd.DataFrame:
    """One Tune trial per row (`rows`: row name -> dotted overrides); resumes an interrupted study."""
    from ray import tune
    init_ray(address)
    root = Path(cfg.run.out_dir).resolve() / cfg.run.name
    trainable = tune.with_resources(row_trial, trial_resources(cfg))
    # One Tune experiment per (config, row set): rerunning the same command restores it; asking for
    # other rows starts a new one (finished stages are still reused from the artifact store).
    from dmvae_study.store import config_digest
    path = root / f"tune-{config_digest({'experiment': cfg.to_dict(), 'rows': rows}, 8)}"
    space = {"experiment": cfg.to_dict(), "row": tune.grid_search(list(rows)), "row_overrides": rows}
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrency(cfg)),
            run_config=tune.RunConfig(name=path.name, storage_path=str(root), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)),
        )
    grid = tuner.fit()
    records = []
    for r in grid:
        if r.error:
            print(f"[study] row {r.config.get('row')} failed: {r.error}", file=sys.stderr)
            continue
        records.append(dict(r.metrics))
    return pd.DataFrame.from_records(records)


def write_tables(df: pd.DataFrame, root: Path, stem: str, caption: str) -> pd.DataFrame:
    """CSV, Parquet, Markdown and LaTeX of a study table; returns the display frame (the paper's
    column names, the same rendering `python -m dmvae_study.report` uses)."""
    from dmvae_study.report import display_table
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / f"{stem}.csv", index=False)
    df.to_parquet(root / f"{stem}.parquet", index=False)
    show, note = display_table(df)
    atomic_write_text(root / f"{stem}.md", f"{caption}\n\n{show.to_markdown(index=False, floatfmt='.3g')}\n\n{note}\n")
    atomic_write_text(root / f"{stem}.tex", show.to_latex(index=False, float_format="%.3g", caption=caption))
    return show
