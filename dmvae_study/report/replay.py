"""The frontier report's ASHA replay: the study's early-stopping rule (`dmvae_study.asha.replay`) applied
afterwards to the rows that ran in full (`--no-asha`), to say which weights ASHA would have kept and whether
those include each seed's best-gFID weight and the matched table's pick. `df` is a study table through
`frontier.frontier_frame`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def asha_replay(root: Path, df: pd.DataFrame, eta: float = 3.0, windows: tuple[int, ...] = (1, 3)) -> pd.DataFrame:
    """The frontier study's early-stopping rule (`dmvae_study.asha.replay`) applied afterwards to the rows
    that ran in full: per (prior, seed) with at least two finished rows whose DMD curve is archived
    (`rows/<row>/curves/dmd.jsonl`), for each signal window, what ASHA would have kept at each rung, next
    to the row's final gFID and PSNR. Rows without an archived DMD curve (e.g. a Table 1 row taken by
    `--reuse` from a study archived before curves were) are left out. Empty when no group qualifies."""
    from dmvae_study.asha import dmd_reports, replay
    ok = df[(df["status"] == "ok") & (df["knob"] == "dm")]
    out = []
    for (prior, seed), g in ok.groupby(["prior", "seed"], sort=True):
        curves = {}
        for row in g["row"]:
            f = root / "rows" / str(row) / "curves" / "dmd.jsonl"
            if f.is_file() and (reps := dmd_reports(f)):
                curves[str(row)] = reps
        if len(curves) < 2:
            continue
        total = max(r[-1]["dmd/step"] for r in curves.values())
        final = g.set_index("row")
        for w in windows:
            lines = replay(curves, total, eta, w)
            if lines.empty:
                continue
            lines.insert(0, "window", w)
            lines.insert(0, "seed", seed)
            lines.insert(0, "prior", prior)
            lines["weight"] = [final.loc[r, "weight"] for r in lines["row"]]
            lines["gfid"] = [final.loc[r, "gfid"] for r in lines["row"]]
            lines["psnr"] = [final.loc[r, "psnr"] for r in lines["row"]]
            out.append(lines)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def replay_text(lines: pd.DataFrame, matched: pd.DataFrame, eta: float) -> list[str]:
    """Per (prior, seed, window): the weights that pass every rung, against this seed's best-gFID weight
    and the matched table's pick for the prior."""
    if lines.empty:
        return ["No (prior, seed) has two finished rows with an archived DMD curve: nothing to replay."]
    pick = dict(zip(matched["prior"], matched["weight"])) if len(matched) else {}
    text = []
    for (prior, seed, w), g in lines.groupby(["prior", "seed", "window"], sort=True):
        last = g[g["rung"] == g["rung"].max()]
        kept = sorted(last.loc[last["kept"], "weight"])
        first = g[g["rung"] == g["rung"].min()]
        best = first.loc[first["gfid"].idxmin(), "weight"]
        mp = pick.get(prior)
        text.append(f"- {prior}, seed {seed}, window {w}: {len(first)} weights replayed, kept through the last rung "
                    f"(step {int(last['step'].max())}): {', '.join(f'{k:g}' for k in kept) or 'none'}; "
                    f"best gFID of this seed at weight {best:g} ({'kept' if best in kept else 'stopped'})"
                    + ("" if mp is None or pd.isna(mp) else
                       f"; matched pick {mp:g} ({'kept' if mp in kept else 'stopped'})"))
    return [f"Synchronous successive halving with ASHA's rungs and cutoff (eta {eta:g}) on the DMD curves of rows "
            f"that ran in full (`dmvae_study.asha.replay`; live, asynchronous ASHA keeps at least these):", ""] + text


__all__ = ["asha_replay", "replay_text"]
