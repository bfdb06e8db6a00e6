"""The frontier study's grid and budget: the DM-weight log grid, each row's knob values, the estimated
cost of its parts, and the rule that sizes the grid and the ASHA reduction factor to a `--budget`
(`studies/frontier.py` runs it)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from dmvae_study.asha import RUNGS
from dmvae_study.report.frontier import BASELINE_KNOB, KNOBS, knob_of
from studies.common import UserError

DEFAULT_WEIGHTS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_RANGE = (0.3, 100.0)
DM_REFERENCE = 10.0            # the paper's weight for data-derived priors: baselines' defaults sit here
CANDIDATE_POINTS = (12, 10, 8, 6, 5, 4, 3)
CANDIDATE_ETAS = (2.0, 3.0, 4.0)
DEFAULT_ETA = 3.0


# ---- the grid ----------------------------------------------------------------------------------------

def round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """`n` log-spaced values over [lo, hi], to one significant digit up to 6 points (0.3 .. 100 in 6 points
    is 0.3, 1, 3, 10, 30, 100), two beyond (denser grids would bunch); values that round together are
    kept once."""
    digits = 1 if n <= 6 else 2
    if n == 1:
        return [round_sig(math.sqrt(lo * hi), digits)]
    vals = [round_sig(lo * (hi / lo) ** (i / (n - 1)), digits) for i in range(n)]
    return list(dict.fromkeys(vals))


def knob_values(row: str, dm_weights: list[float], base: Any, explicit: dict[str, list[float] | None]) -> list[float]:
    """A row's swept values: the DM weights for a prior; for a baseline its `--kl-weights` / `--vf-weights`,
    else its configured default x w / DM_REFERENCE for every DM weight w (two significant digits)."""
    knob = knob_of(row)
    if knob == "dm":
        return list(dm_weights)
    if explicit.get(knob):
        return list(explicit[knob])
    section, key = KNOBS[knob].split(".")
    default = getattr(getattr(base, section), key)
    return list(dict.fromkeys(round_sig(default * w / DM_REFERENCE, 2) for w in dm_weights))


# ---- cost ----------------------------------------------------------------------------------------------

@dataclass
class Costs:
    """Estimated hours (the budget's unit) of the study's parts; `unit` names it."""

    unit: str
    shared: float                                           # work done once (tokenizer, references, teachers)
    dmd: dict[str, float] = field(default_factory=dict)     # prior -> the DMD of one trial
    post: dict[str, float] = field(default_factory=dict)    # prior -> refine + latents + generator + eval
    baseline: dict[str, float] = field(default_factory=dict)  # baseline row -> its whole pipeline

    def full_trial(self, row: str) -> float:
        """One trial of `row` run in full: a baseline's whole pipeline, a prior's DMD and what follows."""
        return self.baseline[row] if row in self.baseline else self.dmd[row] + self.post[row]


def trial_costs(reps: dict[str, Any], seed_reps: list[dict[str, Any]] | None = None) -> Costs:
    """From one resolved config per row (`reps`: row -> config; the knob value changes no FLOP count). Shared
    work (tokenizer, reference sets, teachers) is per seed: `seed_reps` holds one such dict per planned seed,
    and every seed's unfinished shared stages are counted (default: `reps`' own seed alone)."""
    from dmvae_study.cost import hours, stage_cost
    from dmvae_study.pipeline import STAGES, artifact, plan
    first = next(iter(reps.values()))
    gpu = first.run.use_gpu
    h = lambda cfg, st: hours(stage_cost(cfg, st)["flops"], gpu)
    seen: set[str] = set()
    shared = 0.0

    def visit(stage: str, cfg: Any) -> None:  # a shared stage and what it consumes, once, unless finished
        nonlocal shared
        for st, c in STAGES[stage].inputs(cfg).values():
            visit(st, c)
        art = artifact(cfg, stage)
        if art.path.name not in seen:
            seen.add(art.path.name)
            shared += 0.0 if art.done else h(cfg, stage)

    out = Costs(unit="H100-hours" if gpu else "CPU core-hours", shared=0.0)
    for per_seed in seed_reps or [reps]:
        for row, cfg in per_seed.items():
            if row not in BASELINE_KNOB:
                for st in ("tokenizer", "reference", "teacher"):
                    visit(st, cfg)
    for row, cfg in reps.items():
        if row in BASELINE_KNOB:
            out.baseline[row] = sum(h(cfg, st) for st in plan(cfg))
            continue
        out.dmd[row] = h(cfg, "dmd")
        out.post[row] = sum(h(cfg, st) for st in ("refine", "latents", "generator", "eval"))
    out.shared = shared
    return out


def trial_resources(cfg: Any) -> float:
    """What one trial of `cfg` holds while it runs, in the budget's unit per hour: its GPUs (`run.use_gpu`),
    else its CPU cores (the threads its workers run, or the CPUs they reserve, at least one each)."""
    r = cfg.run
    return float(r.num_workers) * (1.0 if r.use_gpu else float(r.threads or max(1, round(r.cpus_per_worker))))


def measured_costs(model: Costs, reps: dict[str, Any], manifests: list[Path]) -> tuple[Costs, dict[str, Any]]:
    """`model` with each trial stage replaced by what finished rows measured: per stage of each planned row,
    the median over `manifests` (finished rows, e.g. of `--reuse` / `--merge` folders) of the stage's
    `summaries.<stage>.wall_s` x the row's `trial_resources`, over rows whose stage has the planned stage's
    FLOP count (the same work at the same sizes; a stage of 0 s, taken from the store, is not a measurement).
    Rows measured under the planned `run.keep_freed_memory` are preferred when there are any: the allocator
    setting halves a CPU trial's stages (BENCHMARKS.md), and a manifest written before the setting existed
    (no such key) ran with glibc's default, i.e. off. A stage without a measurement keeps the model's value;
    shared work stays modelled. Returns the costs and `{(row, stage): (median hours, rows)}` of the stages
    that were measured."""
    import json
    import statistics

    from dmvae_study.config import ExperimentConfig
    from dmvae_study.cost import hours, stage_cost
    from dmvae_study.pipeline import plan
    seen: list[tuple[ExperimentConfig, dict[str, Any], bool]] = []
    for m in manifests:
        try:
            blob = json.loads(m.read_text())
            kept = bool((blob["config"].get("run") or {}).get("keep_freed_memory", False))
            seen.append((ExperimentConfig.from_dict(blob["config"]), blob.get("summaries") or {}, kept))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a finished row of this version's schema: no measurement
    flops: dict[tuple[int, str], float] = {}

    def cost_of(cfg: ExperimentConfig, stage: str) -> float:
        key = (id(cfg), stage)
        if key not in flops:
            flops[key] = stage_cost(cfg, stage)["flops"]
        return flops[key]

    used: dict[tuple[str, str], tuple[float, int]] = {}

    def stage_hours(row: str, rep: Any, stage: str) -> float:
        target = cost_of(rep, stage)
        same = [(cfg, summ, kept) for cfg, summ, kept in seen
                if float((summ.get(stage) or {}).get("wall_s") or 0.0) > 0.0
                and math.isclose(cost_of(cfg, stage), target, rel_tol=1e-9)]
        alike = [r for r in same if r[2] == rep.run.keep_freed_memory]
        vals = [float(summ[stage]["wall_s"]) / 3600.0 * trial_resources(cfg) for cfg, summ, _ in alike or same]
        if not vals:
            return hours(target, rep.run.use_gpu)
        used[(row, stage)] = (statistics.median(vals), len(vals))
        return used[(row, stage)][0]

    out = Costs(unit=model.unit, shared=model.shared)
    for row, cfg in reps.items():
        if row in BASELINE_KNOB:
            out.baseline[row] = sum(stage_hours(row, cfg, st) for st in plan(cfg))
        else:
            out.dmd[row] = stage_hours(row, cfg, "dmd")
            out.post[row] = sum(stage_hours(row, cfg, st) for st in ("refine", "latents", "generator", "eval"))
    return out, used


def dmd_trial_equivalents(n: int, eta: float, rungs: int = RUNGS) -> tuple[float, float]:
    """(full-DMD equivalents, trials past the last rung) of one group of `n` weights under synchronous
    successive halving with rungs at T/eta^(rungs-1), ..., T and at least one trial past every rung."""
    marks = [eta ** -(rungs - 1 - k) for k in range(rungs)]  # rung positions as fractions of T
    frac, prev = 0.0, 0.0
    for k, m in enumerate(marks):
        frac += max(1.0, n / eta ** k) * (m - prev) if k else n * m
        prev = m
    return frac, max(1.0, n / eta ** rungs)


def expected_hours(costs: Costs, n: int, eta: float | None, seeds: int, rungs: int = RUNGS,
                   n_baseline: int | None = None) -> float:
    """The study's estimated cost (see the module docstring); `eta=None`: every trial in full."""
    nb = n if n_baseline is None else n_baseline
    group = 0.0
    for prior in costs.dmd:
        if eta is None:
            group += n * costs.full_trial(prior)
        else:
            frac, survivors = dmd_trial_equivalents(n, eta, rungs)
            group += costs.dmd[prior] * frac + costs.post[prior] * survivors
    return costs.shared + seeds * (group + nb * sum(costs.baseline.values()))


@dataclass
class Grid:
    weights: list[float]
    eta: float | None  # None: no ASHA
    expected: float    # estimated hours with ASHA
    full: float        # estimated hours with every trial in full


def choose_grid(costs: Costs, seeds: int, budget: float | None, weights: list[float] | None = None,
                points: int | None = None, eta: float | None = None, weight_range: tuple[float, float] =
                DEFAULT_RANGE, asha: bool = True) -> Grid:
    """The budget rule (module docstring): the largest grid, then the gentlest reduction factor, that fits."""
    def grid(ws: list[float], e: float | None) -> Grid:
        return Grid(ws, e if asha else None, expected_hours(costs, len(ws), e if asha else None, seeds),
                    expected_hours(costs, len(ws), None, seeds))

    if weights is not None:
        sizes = [weights]
    elif points is not None:
        sizes = [log_grid(*weight_range, points)]
    elif budget is None:
        sizes = [list(DEFAULT_WEIGHTS) if weight_range == DEFAULT_RANGE else log_grid(*weight_range, 6)]
    else:
        sizes = [log_grid(*weight_range, n) for n in CANDIDATE_POINTS]
    etas = [eta] if eta is not None else ([DEFAULT_ETA] if budget is None else list(CANDIDATE_ETAS))
    if budget is None:
        return grid(sizes[0], etas[0])
    best: Grid | None = None
    for ws in sizes:
        for e in etas if asha else [None]:
            g = grid(ws, e)
            if g.expected <= budget:
                return g
            best = g if best is None or g.expected < best.expected else best
    assert best is not None
    raise UserError(f"--budget {budget:g}: the smallest plan ({len(best.weights)} weights"
                    f"{f', reduction factor {best.eta:g}' if best.eta else ''}) needs ~{best.expected:.3g} "
                    f"{costs.unit}; raise --budget to at least {math.ceil(best.expected * 100) / 100:g}, or fewer "
                    f"--priors / --seeds")
