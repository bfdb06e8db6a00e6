"""What a change did to a study, paired by seed: `python -m dmvae_study.report.compare BEFORE AFTER`.

BEFORE and AFTER are two study folders holding the same rows `<row>-s<seed>` under two configurations
(e.g. `docs/mini` and `docs/mini-stop40`, before and after a fix). For every row both hold on common
seeds, per metric: each seed's after - before, their mean and Student-t 95% interval over the common seeds
(`stats.paired`: trials of one seed share the seed's tokenizer, data order and initialisation, so the pairing
removes that part of the noise), "resolved" when the interval excludes 0; and the settings that differ
between the two manifests of the row, so the table says what changed. A row whose evaluation artifact is
the same in both (a `--reuse`d baseline) is marked "same computation": its differences are 0 by construction.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from dmvae_study.configlib import flatten
from dmvae_study.report.stats import base_row, by_seed, paired, seed_of
from dmvae_study.report.study import Study, StudyRow, load_study

METRICS = ("psnr", "rfid", "gfid", "matching_swd")
ABSENT = "(not recorded)"


def changed_settings(before: StudyRow, after: StudyRow) -> dict[str, tuple[Any, Any]]:
    """Dotted config keys whose value differs between two manifests of one row, `{key: (before, after)}`
    (ABSENT where a manifest lacks the key: written before the setting existed). Run fields that do not
    change results (paths, workers, allocator) are left out: only `pipeline.RUN_KEYS` and the precision the
    stages computed in (`run.precision` as `pipeline.amp_precision` reads it: `auto` on CPU workers is fp32) count."""
    from dmvae_study.pipeline import RUN_KEYS, effective_precision
    a, b = flatten(before.config), flatten(after.config)
    for flat in (a, b):
        if "run.precision" in flat:
            flat["run.precision"] = effective_precision(flat["run.precision"], bool(flat.get("run.use_gpu")))
    keep = {f"run.{k}" for k in RUN_KEYS} | {"run.precision"}
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT) and (not k.startswith("run.") or k in keep)}


def differing_weights(before: StudyRow | None, after: StudyRow | None,
                      stages: tuple[str, ...] = ("tokenizer", "teacher")) -> list[str]:
    """The stages among `stages` that both manifests ran under one artifact key but with different weights
    (`StudyRow.weights_id`): retrained, not reused, so the comparison carries that stage's noise too."""
    if before is None or after is None:
        return []
    out = []
    for st in stages:
        ka, kb = before.artifacts.get(st), after.artifacts.get(st)
        wa, wb = before.weights_id(st), after.weights_id(st)
        if ka is not None and kb is not None and ka.name == kb.name and wa and wb and wa != wb:
            out.append(st)
    return out


def _same_computation(before: StudyRow | None, after: StudyRow | None) -> bool:
    ea, eb = (r.artifacts.get("eval") if r is not None else None for r in (before, after))
    return ea is not None and eb is not None and ea.name == eb.name


def _groups(study: Study) -> dict[str, pd.DataFrame]:
    t = study.table
    ok = t[t["status"] == "ok"] if "status" in t else t
    return {r: g for r, g in ok.assign(_row=ok["row"].map(base_row)).groupby("_row", sort=False)}


def compare(before: Study, after: Study, metrics: tuple[str, ...] = METRICS,
            rows: list[str] | None = None) -> pd.DataFrame:
    """One line per row both studies hold (in AFTER's order; `rows` picks some): `seeds` (common), per metric
    `<m>_before`, `<m>_after` (means over the common seeds), `<m>_diff`, `<m>_lo`, `<m>_hi` (after - before,
    paired by seed, Student t), `<m>_resolved`; `same` (same evaluation artifact), `weights_differ` (seeds whose
    tokenizer or teacher was retrained under its key with other weights) and `changed` (the settings that differ,
    `key: before -> after`, from the first common seed's manifests)."""
    ga, gb = _groups(before), _groups(after)
    names = [r for r in gb if r in ga and (rows is None or r in rows)]
    records = []
    for r in names:
        la, lb = _labels(ga[r]), _labels(gb[r])
        seeds = sorted(set(la) & set(lb))
        rec: dict[str, Any] = {"row": r, "seeds": len(seeds)}
        for m in metrics:
            x = by_seed(gb[r], m).reindex(seeds).dropna() if m in gb[r] else pd.Series(dtype=float)
            y = by_seed(ga[r], m).reindex(seeds).dropna() if m in ga[r] else pd.Series(dtype=float)
            diff, lo, hi, n = paired(x, y)
            common = x.index.intersection(y.index)
            rec.update({f"{m}_before": float(y.loc[common].mean()) if n else math.nan,
                        f"{m}_after": float(x.loc[common].mean()) if n else math.nan,
                        f"{m}_diff": diff, f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_resolved": bool(lo > 0 or hi < 0)})
        rec["weights_differ"] = "; ".join(
            f"s{sd}: {', '.join(st)}" for sd in seeds
            if (st := differing_weights(before.rows.get(la[sd]), after.rows.get(lb[sd]))))
        ra, rb = (before.rows.get(la[seeds[0]]), after.rows.get(lb[seeds[0]])) if seeds else (None, None)
        rec["same"] = _same_computation(ra, rb)
        rec["changed"] = "; ".join(f"{k}: {_show(v0)} -> {_show(v1)}" for k, (v0, v1) in
                                   changed_settings(ra, rb).items()) if ra is not None and rb is not None else ""
        records.append(rec)
    return pd.DataFrame.from_records(records)


def per_seed(before: Study, after: Study, metrics: tuple[str, ...] = METRICS,
             rows: list[str] | None = None) -> list[str]:
    """Markdown lines, one per (row, common seed): `before -> after` per metric (rows as in `compare`)."""
    ga, gb = _groups(before), _groups(after)
    lines = ["| row | " + " | ".join(metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for r in (r for r in gb if r in ga and (rows is None or r in rows)):
        la, lb = _labels(ga[r]), _labels(gb[r])
        for s in sorted(set(la) & set(lb)):
            a, b = ga[r][ga[r]["row"] == la[s]].iloc[0], gb[r][gb[r]["row"] == lb[s]].iloc[0]
            cells = [f"{float(a[m]):.{DIGITS.get(m, 2)}f} -> {float(b[m]):.{DIGITS.get(m, 2)}f}"
                     if m in a and m in b and pd.notna(a[m]) and pd.notna(b[m]) else "–" for m in metrics]
            lines.append(f"| {lb[s]} | " + " | ".join(cells) + " |")
    return lines


def _labels(g: pd.DataFrame) -> dict[int, str]:
    """Seed -> row label of one row's lines, keyed as `stats.by_seed` keys them (position for a seedless label)."""
    return {i if (s := seed_of(lab)) is None else s: lab for i, lab in enumerate(g["row"])}


def _show(v: Any) -> str:
    return v if v == ABSENT else repr(v)


def _fmt(d: float, lo: float, hi: float, digits: int) -> str:
    if math.isnan(d):
        return "–"
    if math.isnan(lo):
        return f"{d:+.{digits}f}"
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" + (" **resolved**" if lo > 0 or hi < 0 else "")


DIGITS = {"psnr": 2, "rfid": 1, "gfid": 1, "is": 3, "matching_swd": 3}


def _cell(r: pd.Series, m: str) -> str:
    digits = DIGITS.get(m, 2)
    a, b = r[f"{m}_before"], r[f"{m}_after"]
    if math.isnan(a) or math.isnan(b):
        return "–"
    if r["same"]:
        return f"{b:.{digits}f} (same computation)"
    return f"{a:.{digits}f} -> {b:.{digits}f}: " + _fmt(r[f"{m}_diff"], r[f"{m}_lo"], r[f"{m}_hi"], digits)


def to_markdown(cmp: pd.DataFrame, before: str, after: str, metrics: tuple[str, ...] = METRICS) -> str:
    """The comparison as the README prints it: per row and metric `before -> after: after - before [95% interval]`
    (means over the common seeds), then the settings that differ."""
    lines = [(f"Before `{before}` -> after `{after}`: means over the common seeds, then after - before paired by seed "
              "[95% interval, Student t]; resolved = the interval excludes 0."), "",
             "| row | seeds | " + " | ".join(metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for _, r in cmp.iterrows():
        lines.append(f"| {r['row']} | {r['seeds']} | " + " | ".join(_cell(r, m) for m in metrics) + " |")
    differ = [(r["row"], r["weights_differ"]) for _, r in cmp.iterrows() if r.get("weights_differ")]
    if differ:
        lines += ["", "Retrained under the same artifact key, with different weights (the difference then carries that "
                      "stage's seed noise too): " + "; ".join(f"{row} ({w})" for row, w in differ) + "."]
    changed = sorted({c for c in cmp["changed"] if c}) if len(cmp) else []
    if changed:
        lines += ["", "Settings that differ (the first common seed's manifests):"]
        lines += [f"- {', '.join(cmp.loc[cmp['changed'] == c, 'row'])}: `{c}`" for c in changed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmvae_study.report.compare",
                                 description="What a change did to a study: two study folders with the same rows and "
                                             "seeds, after - before per row and metric, paired by seed.")
    ap.add_argument("before", help="study folder of the earlier runs (rows/*.json), e.g. docs/mini")
    ap.add_argument("after", help="study folder of the new runs, e.g. docs/mini-stop40")
    ap.add_argument("--rows", default=None, help="comma-separated rows to compare (default: every row both hold)")
    ap.add_argument("--metrics", default=None,
                    help=f"comma-separated (default: those of {','.join(METRICS)} the study has)")
    ap.add_argument("--per-seed", action="store_true", help="also list every (row, seed): before -> after")
    ap.add_argument("--csv", default=None, help="also write the comparison as a CSV file")
    args = ap.parse_args(argv)
    try:
        before, after = load_study(args.before), load_study(args.after)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = (tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics
               else tuple(m for m in METRICS if m in after.table))
    numeric = [c for c in after.table.columns if c not in ("seed", "gfid_samples")
               and pd.api.types.is_numeric_dtype(after.table[c]) and not pd.api.types.is_bool_dtype(after.table[c])]
    unknown = [m for m in metrics if m not in numeric]
    if unknown:
        print(f"error: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(numeric)}", file=sys.stderr)
        return 2
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    cmp = compare(before, after, metrics, rows)
    if cmp.empty:
        print(f"error: {args.before} and {args.after} share no row"
              + (f" among {', '.join(rows)}" if rows else ""), file=sys.stderr)
        return 2
    print(to_markdown(cmp, args.before, args.after, metrics), end="")
    if args.per_seed:
        print("\nPer seed:\n\n" + "\n".join(per_seed(before, after, metrics, rows)))
    ga, gb = set(_groups(before)), set(_groups(after))
    for side, only in ((args.before, ga - gb), (args.after, gb - ga)):
        if only and rows is None:
            print(f"\nOnly in {side}: {', '.join(sorted(only))}")
    if args.csv:
        from dmvae_study.store import atomic_write_text
        atomic_write_text(Path(args.csv), cmp.to_csv(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
