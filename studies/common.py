"""What the study scripts share: the CLI, row resolution and validation before Ray, the Tune trial
driver, failure reporting and table output.

Layering (Ray's documented pattern): Tune trial -> driver function `row_trial` -> `run_pipeline`,
which runs a row's stages in-process (one worker) or on a Ray Train TorchTrainer (several workers).
Every row is resolved (`dmvae_study.pipeline.resolve`) and validated in the driver before Ray starts,
so a bad setting costs seconds; a trial receives its resolved config and runs it unchanged.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from dmvae_study.config import PRESETS, ExperimentConfig, preset
from dmvae_study.configlib import ConfigError, dump_yaml, parse_overrides, read_overrides
from dmvae_study.pipeline import LaunchOptions, derived, resolve
from dmvae_study.store import atomic_write_text, preflight_writable

STUDY_FORMAT = 2  # results-folder layout version (rows/<label>.json with "derived"; the stage table's keys)


class UserError(Exception):
    """A user mistake the CLI reports in one line (exit code 2, no traceback unless --debug)."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="named preset (default: smoke)")
    p.add_argument("--out", default="results", help="results root; the study writes <out>/<study>/ (default: results)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="partial config file(s) applied over the preset, before --set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable, e.g. --set dmd.dm_weight=20 (wins over every default)")
    p.add_argument("--seeds", default=None, metavar="S1,S2",
                   help="run every row once per seed (one Tune trial each, rows <row>-s<seed>), e.g. --seeds 0,1,2")
    p.add_argument("--merge", action="append", default=[], metavar="DIR",
                   help="results of earlier parts (a folder of rows/*.json manifests, e.g. committed under docs/): "
                        "a (row, seed) found there with the same resolved config is not run again")
    p.add_argument("--restart", action="store_true",
                   help="start the Tune experiment over; finished stages are still reused from the artifact store")
    p.add_argument("--clean", action="store_true", help="delete this study's cached work (store, Tune state, "
                   "manifests) before running; asks for confirmation unless --yes")
    p.add_argument("--yes", action="store_true", help="do not ask before --clean deletes")
    p.add_argument("--dry-run", action="store_true", help="print each row's stage plan, what is reused and the "
                   "estimated cost, then exit (no Ray, no data)")
    p.add_argument("--print-config", action="store_true", help="print each row's resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--mlflow", metavar="TRACKING_URI", help="also log trials to MLflow (Tune's MLflowLoggerCallback)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log trials to Weights & Biases (credentials from the "
                   "environment: WANDB_API_KEY)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local)")
    return p


def cli(main: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], Any]:
    """Run a study's `main`; any user error ends the process with one line and exit code 2."""
    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> Any:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv)
        except USER_ERRORS as e:
            if "--debug" in argv:
                raise
            print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapped


def _user_errors() -> tuple[type[BaseException], ...]:
    from dmvae_study.data import DatasetNotFoundError
    from dmvae_study.weights import MissingWeightsError
    return (ConfigError, UserError, MissingWeightsError, DatasetNotFoundError)


USER_ERRORS = _user_errors()


def split_list(text: str | None, what: str, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """`"a,b,a"` -> `["a", "b"]`: a value listed twice is run once, with a printed notice (which run the
    user meant is clear: the same one)."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        vals = [cast(s) for s in items]
    except ValueError:
        raise UserError(f"{what}={text}: expected a comma-separated list, e.g. 0,1,2") from None
    seen: list[Any] = []
    for v in vals:
        if v in seen:
            print(f"note: {what} lists {v} twice; running it once", file=sys.stderr)
        else:
            seen.append(v)
    if not seen:
        raise UserError(f"{what}={text!r}: the list is empty")
    return seen


# ---- the study ---------------------------------------------------------------------------------------

@dataclass
class Study:
    name: str                               # e.g. table1-smoke
    root: Path                              # <out>/<name>, absolute
    base: ExperimentConfig                  # preset + --config + --set
    rows: dict[str, ExperimentConfig]       # row label -> resolved config
    args: argparse.Namespace


def base_config(args: argparse.Namespace, name: str) -> ExperimentConfig:
    """The preset with `--config` files then `--set` applied; `--out` made absolute now, so every artifact,
    manifest and table lands under `<out>/<name>/` whatever directory Ray's trials run in."""
    overrides: dict[str, Any] = {}
    for path in args.config:
        overrides.update(read_overrides(path))
    overrides.update(parse_overrides(list(args.overrides), strict=True))
    out = str(Path(args.out).expanduser().resolve())
    for key in ("run.out_dir", "run.name"):
        if key in overrides:
            raise ConfigError(f"{key} is set by the study (use --out DIR), not --set", key=key)
    return preset(args.preset, {**overrides, "run.out_dir": out, "run.name": name})


def resolve_rows(base: ExperimentConfig, rows: dict[str, dict[str, Any]], seeds: list[int] | None,
                 weights: bool = True) -> dict[str, ExperimentConfig]:
    """Row label -> resolved config; with several seeds, one row per (row, seed) labelled `<row>-s<seed>`.
    Every row is resolved and validated here, before Ray starts."""
    from dmvae_study.configlib import apply_overrides
    out: dict[str, ExperimentConfig] = {}
    for row, over in rows.items():
        cfg = apply_overrides(base, over) if over else base
        for seed in seeds or [cfg.run.seed]:
            c = cfg.replace(run=cfg.run.replace(seed=seed)) if seeds else cfg
            label = f"{row}-s{seed}" if seeds else row
            out[label] = resolve(c)
            check_row(out[label])
            if weights:
                check_weights(out[label])
    return out


def check_weights(cfg: ExperimentConfig) -> None:
    """Every pretrained file the row needs is staged and passes its checksum (a corrupt file is refused
    even when random-init is allowed); found here, before Ray, not hours into a cluster run."""
    from dmvae_study.pipeline import required_weights
    from dmvae_study.weights import CorruptWeightsError, MissingWeightsError, checked
    for name, may_be_random in required_weights(cfg).items():
        try:
            checked(name, cfg.run.weights_dir)
        except CorruptWeightsError as e:
            raise UserError(str(e)) from None
        except MissingWeightsError:
            if not (may_be_random and cfg.run.allow_random_weights):
                raise


def check_row(cfg: ExperimentConfig) -> None:
    """Cross-field rules that need the dataset: evaluation counts within the data the row has."""
    if cfg.data.dataset == "fmnist":
        n_train = min(cfg.data.train_limit or 60_000, 60_000)
        n_val = min(cfg.data.val_limit or 10_000, 10_000)
        if cfg.eval.gfid_ref_images is not None and cfg.eval.gfid_ref_images > n_train:
            raise ConfigError(f"eval.gfid_ref_images={cfg.eval.gfid_ref_images}: must be <= the {n_train} training "
                              f"images, e.g. eval.gfid_ref_images={n_train}", key="eval.gfid_ref_images")
        if cfg.eval.rfid_images > n_val and cfg.data.val_limit is not None:
            raise ConfigError(f"eval.rfid_images={cfg.eval.rfid_images}: must be <= data.val_limit={n_val}, "
                              f"e.g. eval.rfid_images={n_val}", key="eval.rfid_images")


def prepare(args: argparse.Namespace, name: str, rows: dict[str, dict[str, Any]]) -> Study | None:
    """Resolve and validate every row, check the results location, handle --clean / --restart, and answer
    --print-config / --dry-run; returns None when nothing is to run. Nothing here starts Ray."""
    base = base_config(args, name)
    seeds = split_list(args.seeds, "--seeds", int)
    resolved = resolve_rows(base, rows, seeds, weights=not (args.dry_run or args.print_config))
    root = Path(base.run.out_dir) / name
    notice_baseline_keys(args, resolved)
    if args.print_config:
        for label, cfg in resolved.items():
            print(f"# ---- row {label}: derived {json.dumps(derived(cfg), default=str)}\n{dump_yaml(cfg)}")
        return None
    if args.dry_run:
        from dmvae_study.cost import dry_run_report
        print(dry_run_report(resolved))
        return None
    if args.clean and root.exists():
        if not args.yes:
            answer = input(f"delete every cached artifact, Tune state and manifest under {root}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise UserError("--clean not confirmed; nothing was deleted")
        shutil.rmtree(root)
    try:
        preflight_writable(root)
    except OSError as e:
        raise UserError(str(e)) from None
    check_format(root)
    merge_parts(args.merge, root)
    return Study(name, root, base, resolved, args)


def merge_parts(dirs: list[str], root: Path) -> None:
    """Copy the row manifests of earlier parts into this study's `rows/` (a row already there is kept)."""
    for d in dirs:
        src = Path(d).expanduser()
        src = src / "rows" if (src / "rows").is_dir() else src
        if not src.is_dir():
            raise UserError(f"--merge {d}: no such folder of row manifests (rows/*.json)")
        for m in sorted(src.glob("*.json")):
            if not m.name.endswith(".failed.json") and not (root / "rows" / m.name).exists():
                atomic_write_text(root / "rows" / m.name, m.read_text())


def done_records(study: Study) -> dict[str, dict[str, Any]]:
    """Rows whose manifest holds a result of the same evaluation artifact (its key chains every stage's
    config and the seed): done, reported, not rerun, whether or not their store is still on disk."""
    from dmvae_study.pipeline import artifact
    out = {}
    for label, cfg in study.rows.items():
        m = study.root / "rows" / f"{label}.json"
        if m.exists():
            blob = json.loads(m.read_text())
            if blob.get("record") and Path(blob.get("artifacts", {}).get("eval", "")).name == \
                    artifact(cfg, "eval").path.name:
                out[label] = blob["record"]
                continue
        stopped = stopped_record(study.root, label)  # a scheduler stopped it early: a result too (status stopped)
        if stopped and Path(stopped.get("artifacts", {}).get("eval", "")).name == artifact(cfg, "eval").path.name:
            out[label] = stopped["record"]
    return out


def stopped_record(root: Path, label: str) -> dict[str, Any] | None:
    """`rows/<label>.stopped.json`: written by a Tune scheduler that stopped the row early (the frontier
    study's ASHA); shaped like a manifest (`row`, `record` with `status: stopped`, `artifacts`)."""
    p = root / "rows" / f"{label}.stopped.json"
    return json.loads(p.read_text()) if p.exists() else None


def notice_baseline_keys(args: argparse.Namespace, rows: dict[str, ExperimentConfig]) -> None:
    """`tokenizer.*` is the DMVAE tokenizer; the vae / vavae rows train the `baseline.*` autoencoder. Say
    so when a user sets the one but not the other and the study has baseline rows."""
    from dmvae_study.pipeline import is_baseline
    if not any(is_baseline(c) for c in rows.values()):
        return
    keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    loose = sorted(k for k in keys if k.startswith("tokenizer.") and "baseline." + k[len("tokenizer."):] not in keys)
    if loose:
        print(f"note: {', '.join(loose)} set(s) the DMVAE tokenizer only; the baseline rows train the baseline.* "
              f"autoencoder (e.g. --set baseline.{loose[0].split('.', 1)[1]}=...)", file=sys.stderr)


def check_format(root: Path) -> None:
    """A results folder written by an incompatible version of the platform is refused, not mixed."""
    marker = root / "STUDY_FORMAT"
    if marker.exists():
        found = marker.read_text().strip()
        if found != str(STUDY_FORMAT):
            raise UserError(f"{root} holds results of study format {found}, this platform writes format "
                            f"{STUDY_FORMAT}; choose another --out or start over with --clean")
    elif (root / "rows").exists() or (root / "store").exists():
        raise UserError(f"{root} holds results of an older platform version (no STUDY_FORMAT marker); "
                        f"choose another --out or start over with --clean")
    else:
        atomic_write_text(marker, f"{STUDY_FORMAT}\n")


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster, or start a local one (dashboard off, bound to loopback). Worker output
    (one progress line per stage interval) reaches this console and `ray job logs`."""
    import ray
    if ray.is_initialized():
        return
    from studies.resources import HEAD
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # the local head also offers the `head` resource trial drivers reserve (studies/resources.py)
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True, resources={HEAD: 1},
                 _temp_dir=os.environ.get("RAY_TMPDIR"))


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
        init_ray(study.args.address)
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
        print(f"\n{len(failed)} row(s) failed:", file=sys.stderr)
        for _, r in failed.iterrows():
            print(f"  {r['row']}: stage {r.get('failed_stage') or '?'}: {r.get('error')}  (log: {r.get('log')})",
                  file=sys.stderr)
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
            info = _failure(study.root, label)
            records.append({"row": label, "prior": study.rows[label].prior.name, "status": "failed",
                            "failed_stage": info.get("stage"), "error": info.get("error") or str(r.error),
                            "log": info.get("log")})
            continue
        records.append({k: v for k, v in r.metrics.items() if not str(k).split("/")[0] in _STAGE_PREFIXES
                        and k != "row_done"})
    return pd.DataFrame.from_records(records)


_STAGE_PREFIXES = {"tokenizer", "reference", "teacher", "dmd", "refine", "latents", "generator", "eval",
                   "config", "time_this_iter_s", "time_total_s", "training_iteration"}


def _failure(root: Path, label: str) -> dict[str, Any]:
    p = root / "rows" / f"{label}.failed.json"
    return json.loads(p.read_text()) if p.exists() else {}


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
