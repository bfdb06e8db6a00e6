"""A study's results folder read back: its table and its row manifests `rows/<row>.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

STUDY_STEMS = ("table1", "ablations", "frontier")  # the study tables `studies/*.py` write
RESULT_COLUMNS = ("row", "prior", "seed", "rfid", "psnr", "gfid", "is", "extractor", "gfid_samples", "matching_swd",
                  "diversity", "latent_diversity", "dm_weight", "cfg_scale", "timestep_schedule", "score_net_size",
                  "reduction", "stand_in", "wall_s", "gpu_hours", "random_init", "status")


@dataclass
class StudyRow:
    """One row's manifest `rows/<row>.json`: resolved config, stage summaries, artifact folders."""

    name: str
    prior: str
    config: dict[str, Any]
    summaries: dict[str, Any]
    artifacts: dict[str, Path]  # stage -> absolute artifact folder
    wall_s: float | None = None
    derived: dict[str, Any] = field(default_factory=dict)  # values the study resolved for this row (dm_weight, ...)
    seed: int | None = None  # the row's seed when the study repeats a prior over seeds (`dinov2-s1`)
    record: dict[str, Any] = field(default_factory=dict)  # the row's table record (studies/trials.flatten_row)
    archive: Path | None = None  # `rows/<row>/` (dmvae_study.report.archive): curves, grids, t-SNE inputs

    @property
    def is_baseline(self) -> bool:
        """Baselines (vae, vavae) have no reference set and no DMD stage."""
        return "reference" not in self.artifacts

    @property
    def dmd_drop_path(self) -> float | None:
        """The stochastic depth the DMD stage trained the encoder with (`dmd.encoder_drop_path`), None for a row
        without DMD. Manifests written before the setting existed (stop 40) ran with the backbone's own rule:
        EfficientNet-Lite0's package builds it with drop connect 0.2; the other backbones had none."""
        if "dmd" not in self.artifacts:
            return None
        dmd = self.config.get("dmd", {})
        if "encoder_drop_path" in dmd:
            return float(dmd["encoder_drop_path"])
        return 0.2 if self.config.get("tokenizer", {}).get("backbone") == "efficientnet_lite0" else 0.0

    def weights_id(self, stage: str) -> str | None:
        """Which weights the row's `stage` artifact (tokenizer or teacher) holds: the fingerprint its summary
        records, else, for a tokenizer finished before it recorded one (stop 41), its measured latent mean and
        scale, which its weights determine. Two rows with one artifact key can differ here: a stage retrained
        after its store was lost (CPU training is not bit-reproducible across machines) keeps its key."""
        s = self.summaries.get(stage) or {}
        if s.get("fingerprint"):
            return str(s["fingerprint"])
        if stage == "tokenizer" and s.get("latent_scale") is not None:
            return f"latent mean {s['latent_mean']:.4f}, scale {s['latent_scale']:.4f}"
        return None

    def artifact(self, stage: str, file: str | None = None) -> Path | None:
        """The stage's folder (or a file in it) when it exists on disk, else None."""
        p = self.artifacts.get(stage)
        if p is None:
            return None
        p = p / file if file else p
        return p if p.exists() else None

    def archived(self, file: str) -> Path | None:
        """A file of the row's archive `rows/<row>/` when it exists, else None."""
        p = None if self.archive is None else self.archive / file
        return p if p is not None and p.exists() else None


@dataclass
class Study:
    """A results folder: its table, its row manifests, and what the report found missing."""

    root: Path
    stem: str
    table: pd.DataFrame
    rows: dict[str, StudyRow]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def preset(self) -> str:
        from dmvae_study.presets import PRESETS
        name = next((r.config.get("run", {}).get("name") for r in self.rows.values()), None) or self.name
        return next((p for p in PRESETS if name.endswith(f"-{p}")), "?")

    @property
    def extractor(self) -> str:
        col = self.table.get("extractor")
        return str(col.dropna().iloc[0]) if col is not None and col.notna().any() else "?"

    @property
    def gfid_samples(self) -> int:
        col = self.table.get("gfid_samples")
        return int(col.dropna().iloc[0]) if col is not None and col.notna().any() else 0

    def ordered_rows(self) -> list[StudyRow]:
        """Manifests in table order, then any row the table lacks."""
        order = [r for r in self.table.get("row", pd.Series(dtype=str)).tolist() if r in self.rows]
        return [self.rows[r] for r in order] + [v for k, v in sorted(self.rows.items()) if k not in order]


def drop_path_notice(rows: list[StudyRow], name_rows: bool = True) -> str | None:
    """The sentence a report opens with when some of its rows trained the DMD encoder with stochastic depth
    (`StudyRow.dmd_drop_path`); None when none did. `name_rows=False` counts them instead of naming them."""
    dmd = [r for r in rows if r.dmd_drop_path is not None]
    noisy = [r for r in dmd if r.dmd_drop_path]
    if not noisy:
        return None
    which = (f"Row(s) {', '.join(f'`{r.name}`' for r in noisy)}" if name_rows
             else f"{len(noisy)} of the {len(dmd)} rows with a DMD stage")
    rates = ", ".join(map(str, sorted({r.dmd_drop_path for r in noisy})))
    return (f"**Note: stochastic depth in DMD.** {which} trained their encoder in DMD with drop connect {rates} "
            "(EfficientNet-Lite0's package default, active in train mode; `dmd.encoder_drop_path`), so their DMD "
            "latents were stochastic. The paper's encoder (timm's DINOv2, drop path 0) is deterministic, which is the "
            "default since stop 40.")


def shared_weights_notice(rows: list[StudyRow], name_rows: bool = True) -> str | None:
    """The sentence a report opens with when rows of one seed that share a tokenizer artifact key (the DMVAE rows)
    started from different tokenizer weights (`StudyRow.weights_id`); None when each key held one set of weights.
    `name_rows=False` counts the rows instead of naming them."""
    groups: dict[tuple[int, str], dict[str, list[str]]] = {}
    for r in rows:
        art, wid = r.artifacts.get("tokenizer"), r.weights_id("tokenizer")
        if r.is_baseline or r.seed is None or art is None or wid is None:
            continue
        groups.setdefault((r.seed, art.name), {}).setdefault(wid, []).append(r.name)
    split = {k: v for k, v in sorted(groups.items()) if len(v) > 1}
    if not split:
        return None

    def who(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) if name_rows else f"{len(names)} row{'s' * (len(names) > 1)}"
    parts = [f"seed {seed} ({len(ids)} under `{key}`): " + "; ".join(f"{wid} ({who(names)})" for wid, names in ids.items())
             for (seed, key), ids in split.items()]
    return ("**Note: one artifact key, different weights.** Rows of one seed started from different tokenizers "
            "under the same artifact key: " + "; ".join(parts) + ". A tokenizer retrained after its store was lost "
            "keeps its key, and CPU training is not bit-reproducible across machines. Paired-by-seed intervals stay "
            "valid (the seeds are still independent), but what a seed's rows share is their data order and "
            "initialisation, not always their tokenizer.")


def load_manifests(root: Path) -> dict[str, StudyRow]:
    """`rows/*.json` -> row name -> StudyRow (artifact paths resolved against the study folder).
    `derived` and `seed` are optional: manifests written before studies recorded them lack them."""
    rows = {}
    for p in sorted((root / "rows").glob("*.json")):
        m = json.loads(p.read_text())
        rows[m["row"]] = StudyRow(name=m["row"], prior=m.get("prior", m["row"]), config=m.get("config", {}),
                                  summaries=m.get("summaries", {}),
                                  artifacts={s: (root / a).resolve() for s, a in m.get("artifacts", {}).items()},
                                  wall_s=m.get("wall_s"), derived=m.get("derived") or {}, seed=m.get("seed"),
                                  record=m.get("record") or {},
                                  archive=(root / "rows" / m["row"]) if (root / "rows" / m["row"]).is_dir() else None)
    return rows


def row_result(row: StudyRow) -> dict[str, Any]:
    """A table row from a manifest's stage summaries (the same record `studies/trials.flatten_row` reports)."""
    ev = row.summaries.get("eval") or {}
    tag = ev.get("extractor", row.config.get("eval", {}).get("extractor"))
    run = row.config.get("run", {})
    wall = row.wall_s
    gpus = run.get("num_workers", 1) if run.get("use_gpu") else 0
    return {"row": row.name, "prior": row.prior, "rfid": ev.get(f"rfid_{tag}"), "psnr": ev.get("psnr"),
            "gfid": ev.get(f"gfid_{tag}"), "is": ev.get(f"is_{tag}"), "extractor": tag,
            "gfid_samples": ev.get("gfid_samples"), "matching_swd": (row.summaries.get("dmd") or {}).get("match/swd"),
            "diversity": ev.get(f"diversity_{tag}"), "latent_diversity": ev.get("latent_diversity"),
            "wall_s": wall, "gpu_hours": (wall or 0.0) * gpus / 3600.0, "random_init": bool(ev.get("random_init"))}


def _stem(root: Path, rows: dict[str, StudyRow]) -> str:
    """The study's table stem from its folder name (`table1-mini`), else from its rows' run name (a folder
    of committed parts such as `docs/mini`), else "table"."""
    names = [root.name, *(r.config.get("run", {}).get("name") or "" for r in rows.values())]
    return next((s for n in names for s in STUDY_STEMS if n.startswith(s)), "table")


def load_study(results_dir: str | Path) -> Study:
    """Read a study folder: its `<stem>.csv` (else rebuilt from the row manifests) and manifests."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no study folder at {root}")
    rows = load_manifests(root)
    notes: list[str] = []
    csv = next((root / f"{s}.csv" for s in STUDY_STEMS if (root / f"{s}.csv").exists()), None)
    written = pd.read_csv(csv) if csv is not None else None
    records = {r.name: r.record for r in rows.values() if r.record}
    if records:
        # A finished row's manifest is the truth: the study table may hold only the last part of a study run
        # in parts (--seeds / --priors subsets, --merge), or be stale from an interrupted run. The table's
        # rows come first in its order; rows it lacks follow, grouped by row; its rows without a manifest
        # record (failed in the last part) are kept as it wrote them.
        stem = csv.stem if csv is not None else _stem(root, rows)
        listed = [r for r in (written["row"] if written is not None else []) if r in records]
        rest = sorted(set(records) - set(listed), key=lambda r: (r.split("-s")[0], r))
        table = pd.DataFrame.from_records([records[r] for r in listed + rest])
        if written is not None:
            table = pd.concat([table, written[~written["row"].isin(records)]], ignore_index=True)
            ok = set(written.loc[written.get("status", pd.Series("ok", index=written.index)) == "ok", "row"])
            if ok != set(records):
                notes.append(f"The table merges {len(records)} row manifests (a study run in parts, or resumed); "
                             f"{csv.name} holds {len(ok)} finished row(s) of the last run only.")
        else:
            notes.append(f"No {'/'.join(f'{s}.csv' for s in STUDY_STEMS)} found: the table was rebuilt from rows/*.json.")
    elif written is not None:
        stem, table = csv.stem, written
    elif rows:
        stem = _stem(root, rows)
        ordered = sorted(rows.values(), key=lambda r: (not r.is_baseline, r.name))  # baselines first, as studies do
        table = pd.DataFrame.from_records([row_result(r) for r in ordered])
        notes.append(f"No {'/'.join(f'{s}.csv' for s in STUDY_STEMS)} found: the table was rebuilt from rows/*.json.")
    else:
        raise FileNotFoundError(f"{root} has neither a study table ({', '.join(f'{s}.csv' for s in STUDY_STEMS)}) "
                                f"nor row manifests (rows/*.json): is it a study results folder?")
    table = table[[c for c in RESULT_COLUMNS if c in table.columns]]  # drop Tune's bookkeeping columns
    if not rows:
        notes.append("No row manifests (rows/*.json, written by each finished study row): the figures need them, "
                     "so only the table is reported.")
    return Study(root=root, stem=stem, table=table, rows=rows, notes=notes)
