"""What the study scripts share before Ray starts: the CLI, row resolution and validation, the results
folder (format, --clean, merged parts, rows already done). Running the trials is `studies.trials`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmvae_study.config import ExperimentConfig
from dmvae_study.configlib import ConfigError, dump_yaml, parse_overrides, read_overrides
from dmvae_study.pipeline import artifact, derived, plan, resolve
from dmvae_study.presets import PRESETS, preset
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
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="finished rows of another study (a folder of rows/*.json, e.g. docs/mini): a row of this "
                        "study whose every stage and seed is the same as one there (the same evaluation artifact) "
                        "takes its result instead of running, e.g. the frontier's default weights from Table 1")
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
        if args.reuse:
            print(reuse_text(args.reuse, resolved))
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
    reused = reuse_rows(args.reuse, root, resolved)
    if reused:
        print(f"note: {len(reused)} row(s) take the result of the same computation in --reuse: "
              f"{', '.join(f'{k} = {v}' for k, v in reused.items())}", file=sys.stderr)
    return Study(name, root, base, resolved, args)


def rows_folder(flag: str, d: str) -> Path:
    src = Path(d).expanduser()
    src = src / "rows" if (src / "rows").is_dir() else src
    if not src.is_dir():
        raise UserError(f"{flag} {d}: no such folder of row manifests (rows/*.json)")
    return src


def _copy_row(manifest: Path, root: Path, label: str, text: str) -> None:
    """Write a row's manifest `text` as `root/rows/<label>.json`, its archive `rows/<row>/` (when it has one)
    copied first, so a manifest that exists has its archive."""
    archive = manifest.with_suffix("")
    if archive.is_dir():
        shutil.copytree(archive, root / "rows" / label, dirs_exist_ok=True)
    atomic_write_text(root / "rows" / f"{label}.json", text)


def merge_parts(dirs: list[str], root: Path) -> None:
    """Copy the row manifests of earlier parts, with their archives `rows/<row>/`, into this study's
    `rows/` (a row already there is kept); the archive first, so a copied manifest has its archive."""
    for d in dirs:
        for m in sorted(rows_folder("--merge", d).glob("*.json")):
            if not m.name.endswith(".failed.json") and not (root / "rows" / m.name).exists():
                _copy_row(m, root, m.stem, m.read_text())


def finished_manifests(dirs: list[str], flag: str = "--reuse") -> list[Path]:
    """The manifests of the rows that finished in `dirs` (folders of rows/*.json; not the failed or stopped
    ones), folder by folder in name order."""
    return [m for d in dirs for m in sorted(rows_folder(flag, d).glob("*.json"))
            if not m.name.endswith((".failed.json", ".stopped.json"))]


def reusable(dirs: list[str], rows: dict[str, ExperimentConfig]) -> dict[str, Path]:
    """Row label -> the finished manifest in `dirs` with the same evaluation artifact (its key chains every
    stage's config and the seed: the same computation)."""
    found: dict[str, Path] = {}  # eval artifact folder name -> manifest
    for m in finished_manifests(dirs):
        blob = json.loads(m.read_text())
        if blob.get("record") and blob.get("artifacts", {}).get("eval"):
            found.setdefault(Path(blob["artifacts"]["eval"]).name, m)
    return {label: found[k] for label, cfg in rows.items() if (k := artifact(cfg, "eval").path.name) in found}


def reuse_text(dirs: list[str], rows: dict[str, ExperimentConfig]) -> str:
    """`--dry-run`'s line on `--reuse`: which rows take a finished result instead of running."""
    found = reusable(dirs, rows)
    names = "".join(f"\n  {k} = {v.stem}" for k, v in found.items())
    return f"--reuse: {len(found)} of {len(rows)} row(s) are finished there and will not run{names}"


def reuse_rows(dirs: list[str], root: Path, rows: dict[str, ExperimentConfig]) -> dict[str, str]:
    """Rows of this study without a manifest whose evaluation artifact (its key chains every stage's config
    and the seed) is that of a finished row in `dirs`: the row is the same computation, so its manifest
    and archive are copied under this study's label, with this study's artifact paths (the same keys in
    its store) and `reused_from`. Returns label -> the row it reuses."""
    reused = {}
    for label, src in reusable(dirs, rows).items():
        if (root / "rows" / f"{label}.json").exists():
            continue
        blob = json.loads(src.read_text())
        blob.update(row=label, record={**blob["record"], "row": label}, reused_from=str(src.resolve()),
                    artifacts={s: os.path.relpath(artifact(rows[label], s).path, root) for s in plan(rows[label])})
        _copy_row(src, root, label, json.dumps(blob, indent=1, default=str))
        reused[label] = src.stem
    return reused


def done_records(study: Study) -> dict[str, dict[str, Any]]:
    """Rows whose manifest holds a result of the same evaluation artifact (its key chains every stage's
    config and the seed): done, reported, not rerun, whether or not their store is still on disk."""
    return done_in(study.root / "rows", study.rows)


def done_in(rows_dir: Path, rows: dict[str, ExperimentConfig]) -> dict[str, dict[str, Any]]:
    """`done_records` for a folder of row manifests: label -> record of `<label>.json`, else of
    `<label>.stopped.json` (a scheduler stopped it early: a result too, status stopped), when it holds a
    result of the row's evaluation artifact."""
    out = {}
    for label, cfg in rows.items():
        key = artifact(cfg, "eval").path.name
        for m in (rows_dir / f"{label}.json", rows_dir / f"{label}.stopped.json"):
            blob = json.loads(m.read_text()) if m.exists() else {}
            if blob.get("record") and Path(blob.get("artifacts", {}).get("eval", "")).name == key:
                out[label] = blob["record"]
                break
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
