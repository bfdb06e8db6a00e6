"""The frontier study's early-stopping rule, in one place: the signal ASHA compares, the DMD steps at which
it decides, and a replay of those decisions on finished trajectories.

`studies/frontier.py` runs the rule live (`PerPriorASHA`, one `ray.tune.schedulers.ASHAScheduler` per
(prior, seed)); `replay` applies the same rule afterwards to the DMD curves of rows that ran in full
(`--no-asha`), so a study can check whether the rule would have kept the weights its report picks. The
rationale for the signal and its window is in the docstring of `studies/frontier.py`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from dmvae_study.store import read_jsonl

TIME_ATTR = "dmd/step"
SIGNAL_WINDOW = 3   # a rung compares the mean signal of a row's last 3 DMD reports
RUNGS = 3           # rungs per ASHA: DMD steps T / eta^2, T / eta, T


def signal(result: dict[str, Any]) -> float | None:
    """`log(dmd/loss/rec) + log(dmd/match/swd)` of one DMD report (lower is better); None when the result
    is not a DMD report or a factor is missing or not positive."""
    rec, swd = result.get("dmd/loss/rec"), result.get("dmd/match/swd")
    if TIME_ATTR not in result or rec is None or swd is None or not rec > 0 or not swd > 0:
        return None
    return math.log(rec) + math.log(swd)


def windowed(signals: list[float], window: int) -> float:
    """The value a rung compares: the mean of the last `window` raw signals."""
    recent = signals[-window:]
    return sum(recent) / len(recent)


def grace_period(total_steps: int, eta: float, rungs: int = RUNGS) -> int:
    """First rung: `T / eta^(rungs-1)` DMD steps (rounded down, so ASHA builds all `rungs` rungs and the last
    sits at, or just before, `T`: the end of DMD)."""
    g = max(1, int(total_steps / eta ** (rungs - 1)))
    while g > 1 and ashas_rungs(total_steps, g, eta) < rungs:
        g -= 1
    return g


def ashas_rungs(max_t: int, grace: int, eta: float) -> int:
    """How many rungs `ASHAScheduler(max_t, grace_period, reduction_factor)` builds (its own formula)."""
    return int(np.log(max_t / grace) / np.log(eta) + 1)


def rung_steps(total_steps: int, eta: float, rungs: int = RUNGS) -> list[int]:
    """The DMD steps at which ASHA decides."""
    g = grace_period(total_steps, eta, rungs)
    return [int(g * eta ** k) for k in range(min(rungs, ashas_rungs(total_steps, g, eta)))]


def cutoff(values: Iterable[float], eta: float) -> float:
    """The largest signal a rung keeps: Ray's `_Bracket.cutoff` (the `1 - 1/eta` quantile of the negated
    metric in min mode, linear interpolation), i.e. the `1/eta` quantile of the signals."""
    return float(np.nanpercentile(np.asarray(list(values), float), 100.0 / eta))


def dmd_reports(curve: Path) -> list[dict[str, float]]:
    """A DMD stage's `metrics.jsonl` (or an archived `curves/dmd.jsonl`) as Tune reports (`dmd/` keys), one
    per logged step (the last line of a step wins: a resumed stage logs its step again), in step order."""
    by_step: dict[int, dict[str, float]] = {}
    for d in read_jsonl(curve):
        if "step" in d and "match/swd" in d and "loss/rec" in d:
            by_step[int(d["step"])] = {TIME_ATTR: int(d["step"]), "dmd/loss/rec": d["loss/rec"],
                                       "dmd/match/swd": d["match/swd"]}
    return [by_step[k] for k in sorted(by_step)]


def replay(curves: dict[str, list[dict[str, float]]], total_steps: int, eta: float,
           window: int = SIGNAL_WINDOW, rungs: int = RUNGS) -> pd.DataFrame:
    """Synchronous successive halving with ASHA's rungs and cutoff on the full DMD reports of one group
    (one prior and seed; `curves`: row -> its reports): at each rung every surviving row's windowed signal
    at its first report at or after the rung, and the rows at or under `cutoff` go on. (Asynchronous ASHA
    promotes the first rows of a rung unconditionally, so it keeps at least these.) One line per (row, rung
    reached): `row, rung, step, value, cutoff, kept`."""
    survivors = [r for r, reps in curves.items() if any(signal(x) is not None for x in reps)]
    lines = []
    for rung in rung_steps(total_steps, eta, rungs):
        values = {}
        for r in survivors:
            seen = [x for x in curves[r] if signal(x) is not None]
            upto = next((i for i, x in enumerate(seen) if x[TIME_ATTR] >= rung), None)
            if upto is not None:
                values[r] = (seen[upto][TIME_ATTR], windowed([signal(x) for x in seen[:upto + 1]], window))
        if not values:
            break
        cut = cutoff((v for _, v in values.values()), eta)
        for r, (step, v) in values.items():
            lines.append({"row": r, "rung": rung, "step": step, "value": v, "cutoff": cut, "kept": v <= cut})
        survivors = [r for r, (_, v) in values.items() if v <= cut]
    return pd.DataFrame(lines, columns=["row", "rung", "step", "value", "cutoff", "kept"])
