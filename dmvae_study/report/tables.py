"""The study table in the paper's column names (Table 1 / Table 2), and the per-row settings table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from dmvae_study.report.study import Study
from dmvae_study.store import atomic_write_text

TABLE_COLUMNS = {  # result column -> displayed name (paper Table 1 names first, then what the study derived)
    "row": "row", "prior": "prior", "seed": "seed", "rfid": "rFID", "psnr": "PSNR", "gfid": "gFID", "is": "IS",
    "matching_swd": "match SW", "dm_weight": "DM weight", "cfg_scale": "DM CFG", "timestep_schedule": "t schedule",
    "score_net_size": "score net", "stand_in": "stands in for", "wall_s": "wall s", "gpu_hours": "GPU-h",
    "random_init": "random-init", "status": "status",
}
TABLE_CAPTIONS = {"table1": "Table 1", "ablations": "Table 2", "frontier": "Frontier (DM weight sweep)"}  # study stem -> the paper table it reproduces


def random_init_rows(df: pd.DataFrame) -> list[str]:
    """Rows whose `random_init` is true (bool, or "True" read back from text; a missing value is not)."""
    if "random_init" not in df:
        return []
    flag = df["random_init"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    return df.loc[flag, "row"].astype(str).tolist() if "row" in df else ["?"] * int(flag.sum())


def display_table(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Result frame -> (frame with the paper's column names, footnote on features and random init)."""
    n = int(df["gfid_samples"].dropna().iloc[0]) if "gfid_samples" in df and df["gfid_samples"].notna().any() else 0
    gfid = f"gFID-{n // 1000}k" if n >= 1000 else f"gFID-{n}"
    show = df[[c for c in TABLE_COLUMNS if c in df.columns]].rename(columns={**TABLE_COLUMNS, "gfid": gfid})
    if "prior" in show and "row" in show and (show["prior"] == show["row"]).all():
        show = show.drop(columns="prior")  # Table 1: one row per prior, the name once is enough
    for col in ("seed", "stands in for", "status"):  # only when they say something
        if col in show and (show[col].isna().all() or show[col].nunique(dropna=False) == 1
                            and (col != "stands in for" or show[col].isna().all())):
            show = show.drop(columns=col)
    extractor = df["extractor"].dropna().iloc[0] if "extractor" in df and df["extractor"].notna().any() else "?"
    note = f"Features: {extractor}."
    if random_init_rows(df):
        note += " Rows marked random-init used randomly initialised backbones (no pretrained weights)."
    return show, note


def table_caption(study: Study) -> str:
    return f"{TABLE_CAPTIONS.get(study.stem, study.stem)} ({study.preset}): {study.name}"


def markdown_table(df: pd.DataFrame) -> str:
    """A frame as a GitHub Markdown table, 3 significant digits, "–" for missing values."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=".3g", missingval="–")


def write_table_files(df: pd.DataFrame, out: Path, stem: str, caption: str) -> tuple[pd.DataFrame, str]:
    """The one table writer (studies and the report): `<stem>.{csv,parquet,md,tex}` into `out`; returns
    the display frame (the paper's column names) and its footnote."""
    out.mkdir(parents=True, exist_ok=True)
    show, note = display_table(df)
    atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False))
    df.to_parquet(out / f"{stem}.parquet", index=False)
    atomic_write_text(out / f"{stem}.md", f"{caption}\n\n{markdown_table(show)}\n\n{note}\n")
    atomic_write_text(out / f"{stem}.tex", show.to_latex(index=False, float_format="%.3g", caption=caption,
                                                         na_rep="--"))
    return show, note


def write_tables(study: Study, out: Path) -> tuple[pd.DataFrame, str]:
    """The study's table files into the report folder."""
    return write_table_files(study.table, out, study.stem, table_caption(study))


def _setting(v: Any) -> Any:
    """A manifest value as one table cell: lists and dicts as compact JSON, scalars as they are."""
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else v


def row_settings(study: Study) -> pd.DataFrame | None:
    """Per row, its seed and the values the study derived for it (manifest `derived`: dm_weight,
    cfg_scale, timestep_schedule, ...); None when no manifest records any."""
    if not any(r.derived or r.seed is not None for r in study.rows.values()):
        return None
    dmd = any(r.dmd_drop_path is not None for r in study.rows.values())
    records = [{"row": r.name, "prior": r.prior, "seed": r.seed, **{k: _setting(v) for k, v in r.derived.items()},
                **({"dmd_drop_path": _setting(r.dmd_drop_path)} if dmd else {})}  # recorded or the backbone's rule
               for r in study.ordered_rows()]
    df = pd.DataFrame(records, dtype=object)  # object: a seed column with gaps stays 1, not 1.0
    if dmd:
        df = df[[c for c in df.columns if c != "dmd_drop_path"] + ["dmd_drop_path"]]
    if df["seed"].isna().all():
        df = df.drop(columns="seed")
    if (df["prior"] == df["row"]).all():
        df = df.drop(columns="prior")
    return df
