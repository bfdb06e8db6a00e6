"""A fair cross-prior comparison: each prior's reconstruction-generation frontier over its DM weight.

    python studies/frontier.py --dry-run [--preset imagenet256] [--budget 3000]   # the plan and its cost
    python studies/frontier.py --priors dinov2,gaussian,vae --seeds 0,1 [--weights 0.3,1,3,10,30,100]
    python -m dmvae_study.report.frontier results/frontier-smoke                  # fronts + matched table

Table 1 fixes the DM weight by a heuristic (10 data-derived, 1 synthetic; Sec. 4) and Table 2 shows the
weight moves PSNR and gFID more than the gaps between priors. Here every prior sweeps `dmd.dm_weight`
on a log grid (default 0.3, 1, 3, 10, 30, 100; `--weights`, or `--points` over `--weight-range`) and the
baselines sweep their own knob on the same relative grid: `vae` the beta-VAE's `baseline.kl_weight`,
`vavae` VA-VAE's `baseline.vavae_weight`, each at `default x w / 10` (their default sits where DM weight
10 sits). One Tune trial per (row, knob value, seed), labelled `<prior>@<knob>=<value>[-s<seed>]`.
Stages the weight does not enter (the shared tokenizer, each prior's reference set and teacher: their
artifact keys hold no `dmd.*` field, `dmvae_study.pipeline.STAGES`) run once, before the trials, and are
reused by every weight through the artifact store.

Early stopping (ASHA, `ray.tune.schedulers.ASHAScheduler`), on what the DMD stage reports every
`run.log_every` steps through `trainers.common.loop_tail` -> `report_interval` (`LaunchOptions(report=
"tune")`): time is `dmd/step`, the signal (lower is better) is

    log(dmd/loss/rec) + log(dmd/match/swd)

the log of the product of the reconstruction loss (L1 + LPIPS, the GAN term excluded, so positive) and
the sliced Wasserstein distance between the latents and reference samples. Why this one: the DM weight
trades exactly these two (a larger weight pulls the latents onto the reference, lower SWD, at some
reconstruction); `loss/dm` is scaled by the weight itself, so it cannot rank weights; and a product is
unit-free in each factor: rescaling SWD (the reference space's scale) or the reconstruction loss (its
terms' weights) shifts every trial of a prior by the same constant and leaves the ranking unchanged, so no
exchange rate between the two has to be invented. A trial stopped on it is one that is worse on the
product than most weights seen at the same DMD step: it lost on both axes, or lost much more on one
than it gained on the other. The extremes of the grid are what ASHA prunes first, by design of the cost
control; pass `--no-asha` (or a larger `--budget`) to run every weight in full. That includes the
low-weight end, where PSNR is highest, which the matched table below may need: on the mini preset the
first rung (DMD step 100 of 600) stopped DM weight 0.3 against weight 1 on an SWD 1.5% higher and a
reconstruction loss 0.3% lower, so the mini frontier is measured with `--no-asha` (README).

Smoothing (`--signal-window K`, default 3): a rung compares the mean signal of each row's last K DMD
reports (K x `run.log_every` steps), not the last report alone. One report's SWD comes from a single batch
(the batch's latents against as many reference samples), and it moves by 15-30% between consecutive
reports of one trial (mini study, sub_dino-s0, DMD steps 300-600: 0.219, 0.282, 0.238, 0.294), more than
weights a factor 3 apart differ early on. Every row of a group is compared at the same step over the same
window. The window restarts when a driver restarts (it lives in the scheduler).

Grouping: ASHA compares trials of the same prior and seed only (one ASHA per (prior, seed),
`PerPriorASHA`). Across priors the signal is not comparable (each SWD is measured in its own reference
space, e.g. a unit Gaussian vs DINO features), so one ASHA over all trials would prune whole priors by the
scale of their reference. Within a seed, weights share data order and initialisation (common random
numbers), the lowest-variance comparison; seeds may therefore keep different weights, and the report
averages each weight over the seeds that finished it (and says how many). Baseline rows have no DMD stage
and no DMD signal: they are never stopped. ASHA's rungs are at DMD steps `T / eta^2, T / eta, T`
(`T = dmd.total_steps`, `eta` the reduction factor): the last rung decides, at the end of DMD, which
trials pay for refinement, stage 2 and evaluation, the bulk of a trial's cost. A stopped trial leaves
`rows/<row>.stopped.json` (step and signal) and is listed with `status: stopped`; it is not a failure and
is not run again on resume (`--rerun-stopped` does).

Cost control (`--budget HOURS`, in H100-hours when `run.use_gpu`, else CPU core-hours:
`dmvae_study.cost.hours`). Costs come from `dmvae_study.cost.stage_cost` (counted FLOPs): shared work
`S` (each planned seed's tokenizer, references and teachers not yet finished), per prior trial its DMD `D` and what follows
`P` (refine, latents, generator, eval), per baseline trial its whole pipeline `B`. When the `--reuse` /
`--merge` folders hold finished rows, a trial stage's cost is what they measured instead
(`frontier_budget.measured_costs`: the median stage wall time x the trial's cores or GPUs, over rows whose
stage does the same FLOPs, preferring rows run under the planned `run.keep_freed_memory`). `--dry-run` prints
both; on the mini preset with the committed rows they agree in total (37.1 core-h measured, 37.4 modelled, for
the default plan in full: ten rows, six weights, one seed)
but not per stage: stage 2 measures 1.8x the model, the beta-VAE tokenizer 0.45x. With `n` weights,
`eta` and 3 rungs, a (prior, seed) group is expected to cost (synchronous successive halving, at least one
trial past every rung) `D * (n / eta^2 + max(1, n / eta) * (1/eta - 1/eta^2) + max(1, n / eta^2) *
(1 - 1/eta)) + P * max(1, n / eta^3)`, and the study `S + seeds * (sum over priors + n * sum of B)`.
The rule: the largest `n` of 12, 10, 8, 6, 5, 4, 3 (log grid over `--weight-range`, `log_grid`) for which some `eta` of 2, 3, 4 fits the budget, with the smallest such `eta` (the gentlest
pruning); `--weights` / `--points` fix `n` and `--reduction-factor` fixes `eta`. No fit: an error naming
the smallest budget that fits. Without `--budget`: the default grid and `eta = 3`. Asynchronous halving
promotes the first trials of a rung unconditionally, so the estimate is a floor; `--dry-run` prints it
next to the cost of every trial in full. Writes frontier.{csv,parquet,md,tex} and rows/*.json under
<out>/frontier-<preset>/; rerunning resumes (`Tuner.restore`, finished rows from their manifests).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from dmvae_study.asha import (RUNGS, SIGNAL_WINDOW, TIME_ATTR, ashas_rungs, grace_period, rung_steps,  # noqa: F401
                               signal, windowed)
from dmvae_study.report.frontier import BASELINE_KNOB, KNOBS, knob_of, row_label
from studies.common import (UserError, base_config, cli, parser, finished_manifests, prepare, resolve_rows,
                            done_in, reusable, rows_folder, split_list, stopped_record)
from studies.frontier_budget import (Costs, Grid, choose_grid, expected_hours, knob_values, measured_costs,
                                     trial_costs)
from studies.trials import run_study

SIGNAL = "frontier/signal"     # computed by the scheduler from the DMD reports (not reported by the stage)


# ---- the scheduler ----------------------------------------------------------------------------------------

class PerPriorASHA(FIFOScheduler):
    """One `ASHAScheduler` per group (a prior and a seed) on `SIGNAL` over `TIME_ATTR`; rows without a
    group (baselines) run first-in first-out and are never stopped. A stopped row is written to
    `rows/<row>.stopped.json` as a manifest-shaped record (`status: stopped`).

    `groups`: row label -> group key (None: not scheduled); `max_t`: row label -> its `dmd.total_steps`;
    `info`: row label -> `{"prior", "seed", "artifacts", "knob", "weight"}` for the stopped record."""

    def __init__(self, groups: dict[str, Any], max_t: dict[str, int], eta: float, root: str | Path,
                 info: dict[str, dict[str, Any]], rungs: int = RUNGS, window: int = SIGNAL_WINDOW):
        super().__init__()  # metric stays None: Tune then does not demand the signal in every result
        self.groups, self.max_t, self.eta, self.rungs, self.window = groups, max_t, eta, rungs, window
        self.root, self.info = Path(root), info
        self._asha: dict[Any, ASHAScheduler] = {}
        self._history: dict[str, list[float]] = {}  # row label -> its raw signals, in report order
        self.stopped: dict[str, dict[str, Any]] = {}

    def _sub(self, trial) -> ASHAScheduler | None:
        label = trial.config.get("row")
        key = self.groups.get(label)
        if key is None:
            return None
        if key not in self._asha:
            t = self.max_t[label]
            self._asha[key] = ASHAScheduler(time_attr=TIME_ATTR, metric=SIGNAL, mode="min", max_t=t,
                                            grace_period=grace_period(t, self.eta, self.rungs),
                                            reduction_factor=self.eta, stop_last_trials=False)
        return self._asha[key]

    def _with_signal(self, label: str, result: dict[str, Any], record: bool = True) -> dict[str, Any] | None:
        """`result` with `SIGNAL`: the mean raw signal of this row's last `window` DMD reports (this one
        included; `record=False` reads without appending, for a final result already seen)."""
        s = signal(result)
        if s is None:
            return None
        hist = self._history.setdefault(label, [])
        if record:
            hist.append(s)
        return {**result, SIGNAL: windowed(hist or [s], self.window), SIGNAL + "_raw": s}

    def on_trial_add(self, tune_controller, trial) -> None:
        if (sub := self._sub(trial)) is not None:
            sub.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        sub = self._sub(trial)
        res = None if sub is None else self._with_signal(trial.config["row"], result)
        if sub is None or res is None:
            return TrialScheduler.CONTINUE
        action = sub.on_trial_result(tune_controller, trial, res)
        if action == TrialScheduler.STOP:
            self._record_stop(trial.config["row"], res)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        sub = self._sub(trial)
        if sub is not None and trial.trial_id in sub._trial_info:
            res = self._with_signal(trial.config["row"], result, record=False)
            if res is None:
                sub.on_trial_remove(tune_controller, trial)
            else:
                sub.on_trial_complete(tune_controller, trial, res)

    def on_trial_remove(self, tune_controller, trial) -> None:
        sub = self._sub(trial)
        if sub is not None and trial.trial_id in sub._trial_info:
            sub.on_trial_remove(tune_controller, trial)

    def _record_stop(self, label: str, res: dict[str, Any]) -> None:
        import json

        from dmvae_study.store import atomic_write_text
        info = self.info.get(label, {})
        record = {"row": label, "prior": info.get("prior"), "seed": info.get("seed"), "status": "stopped",
                  "dm_weight": info.get("weight") if info.get("knob") == "dm" else None,
                  "stopped_at_step": int(res[TIME_ATTR]), "signal": float(res[SIGNAL]),
                  "signal_last_report": float(res[SIGNAL + "_raw"]), "signal_window": self.window,
                  "matching_swd": res.get("dmd/match/swd"), "dmd_loss_rec": res.get("dmd/loss/rec")}
        self.stopped[label] = record
        blob = {"row": label, "prior": info.get("prior"), "seed": info.get("seed"), "record": record,
                "artifacts": info.get("artifacts", {})}
        atomic_write_text(self.root / "rows" / f"{label}.stopped.json", json.dumps(blob, indent=1, default=str))

    def debug_string(self) -> str:
        return f"PerPriorASHA: {len(self._asha)} group(s), {len(self.stopped)} stopped"


# ---- the study ------------------------------------------------------------------------------------------

def _floats(text: str | None, what: str) -> list[float] | None:
    vals = split_list(text, what, float)
    if vals is not None and any(v < 0 for v in vals):
        raise UserError(f"{what}={text}: weights must be >= 0")
    return vals


def measured_text(used: dict[tuple[str, str], tuple[float, int]], model_note: str | None) -> str | None:
    """`--dry-run`'s lines on the measured stage costs (None when nothing was measured)."""
    if not used:
        return None
    by_row: dict[str, list[str]] = {}
    for (row, stage), (h, n) in used.items():
        by_row.setdefault(row, []).append(f"{stage} {h:.3g} ({n})")
    return ("costs measured by finished rows of --reuse / --merge (median stage wall time x the trial's cores or "
            "GPUs, over rows with the same stage FLOPs, those run under the planned run.keep_freed_memory where any; "
            "count in brackets; unmeasured stages and shared work "
            "from the FLOP model):\n" + "\n".join(f"  {row}: {', '.join(v)}" for row, v in by_row.items())
            + (f"\n{model_note}" if model_note else ""))


def finished_already(planned: dict[str, Any], root: Path, args: Any) -> dict[str, str]:
    """Planned trials a run would not run (label -> where the result is): done or stopped in this study's
    folder or a --merge part (by label, as `merge_parts` copies them; stopped rows count unless
    --rerun-stopped), or the same computation finished in --reuse (by evaluation artifact)."""
    done: dict[str, str] = {}
    folders = ([root / "rows"] if (root / "rows").is_dir() else []) + [rows_folder("--merge", d) for d in args.merge]
    for rows_dir in folders:
        for label, record in done_in(rows_dir, planned).items():
            if not (args.rerun_stopped and record.get("status") == "stopped"):
                done.setdefault(label, str(rows_dir))
    for label, m in reusable(args.reuse, planned).items():
        done.setdefault(label, str(m))
    return done


def done_text(planned: dict[str, Any], costs: Costs, done: dict[str, str]) -> str:
    """`--dry-run`'s lines on the trials already finished (`done`: label -> where; a run skips them) and the
    cost of the rest."""
    todo = [k for k in planned if k not in done]
    lines = [f"already finished (--merge / --reuse / this study's folder; not run again): {len(done)} of "
             f"{len(planned)} trial(s)" + "".join(f"\n  {k}: {v}" for k, v in done.items())]
    if not todo:  # no trial left: no shared work is needed either
        lines.append("still to run: 0 trial(s): nothing to train (the estimates above count every planned trial)")
        return "\n".join(lines)
    full = costs.shared + sum(costs.full_trial(planned[k].prior.name) for k in todo)
    lines.append(f"still to run: {len(todo)} trial(s), ~{full:.3g} {costs.unit} in full with the shared work "
                 f"(the estimates above count every planned trial)")
    return "\n".join(lines)


def plan_text(rows: dict[str, Any], grid: Grid, costs: Costs, budget: float | None,
              window: int = SIGNAL_WINDOW, measured: str | None = None) -> str:
    """`--dry-run`: the trials, the ASHA settings, the estimated cost and the stage plan of one planned trial per
    row and seed (its first knob value: what is reused and what it trains are that trial's own)."""
    from dmvae_study.cost import dry_run_report
    first = next(iter(rows.values()))
    t = first.dmd.total_steps
    lines = [f"frontier plan: {len(rows)} trial(s); DM weights {', '.join(f'{w:g}' for w in grid.weights)}"]
    if grid.eta:
        marks = rung_steps(t, grid.eta)
        lines.append(f"ASHA per (prior, seed): time {TIME_ATTR}, signal log(loss/rec) + log(match/swd) (min, "
                     f"mean of the last {window} report(s)), "
                     f"reduction factor {grid.eta:g}, rungs at DMD steps {', '.join(map(str, marks))} of {t}; "
                     f"baselines are never stopped")
    else:
        lines.append("no ASHA (--no-asha): every trial runs in full")
    for label, cfg in rows.items():
        knob = knob_of(cfg.prior.name)
        section, key = KNOBS[knob].split(".")
        value = getattr(getattr(cfg, section), key)
        lines.append(f"  {label:28s} prior {cfg.prior.name:16s} seed {cfg.run.seed:<3d} {KNOBS[knob]}={value:g}")
    lines.append(f"estimated cost ({costs.unit}): shared work {costs.shared:.3g}; every trial in full "
                 f"{grid.full:.3g}; with ASHA (expected, a floor) {grid.expected:.3g}"
                 + (f"; budget {budget:g}" if budget is not None else ""))
    if measured:
        lines.append(measured)
    one_trial: dict[tuple[str, int], tuple[str, Any]] = {}  # (prior, seed) -> its first planned trial
    for label, cfg in rows.items():
        one_trial.setdefault((cfg.prior.name, cfg.run.seed), (label, cfg))
    lines.append("stage plan of one planned trial per row and seed (dmvae_study.cost; the knob value changes no "
                 "cost; artifact names after the teacher differ per value):")
    lines.append(dry_run_report(dict(one_trial.values())))
    return "\n".join(lines)


def frontier(argv: list[str] | None = None, trainable: Callable[[dict[str, Any]], None] | None = None
             ) -> pd.DataFrame | None:
    """The study; `trainable` replaces the row driver (tests run a stub pipeline through the same ASHA)."""
    from dmvae_study.configlib import apply_overrides
    from dmvae_study.pipeline import artifact, plan, resolve
    from priors import ROWS
    p = parser(__doc__)
    p.add_argument("--priors", default=",".join(ROWS), help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    p.add_argument("--weights", default=None, metavar="W1,W2", help="DM weights, e.g. 0.3,1,3,10,30,100 "
                   "(default: that grid, or sized by --budget)")
    p.add_argument("--points", type=int, default=None, help="number of log-spaced DM weights over --weight-range")
    p.add_argument("--weight-range", default="0.3,100", metavar="LO,HI", help="DM weight range (default 0.3,100)")
    p.add_argument("--kl-weights", default=None, metavar="K1,K2", help="vae row: baseline.kl_weight values "
                   "(default: its default x w/10 for each DM weight w)")
    p.add_argument("--vf-weights", default=None, metavar="V1,V2", help="vavae row: baseline.vavae_weight values "
                   "(default: its default x w/10)")
    p.add_argument("--budget", type=float, default=None, metavar="HOURS", help="H100-hours (run.use_gpu) or CPU "
                   "core-hours: sizes the grid and ASHA's reduction factor (rule in the docstring)")
    p.add_argument("--reduction-factor", type=float, default=None, metavar="ETA", help="ASHA's eta (default: "
                   "3, or chosen by --budget)")
    p.add_argument("--no-asha", action="store_true", help="no early stopping: every trial runs in full")
    p.add_argument("--rerun-stopped", action="store_true", help="run rows ASHA stopped in an earlier run again")
    p.add_argument("--signal-window", type=int, default=SIGNAL_WINDOW, metavar="K", help="ASHA compares the mean "
                   f"signal of each row's last K DMD reports (default {SIGNAL_WINDOW}; 1: the last report alone)")
    args = p.parse_args(argv)
    if args.signal_window < 1:
        raise UserError(f"--signal-window {args.signal_window}: must be >= 1, e.g. {SIGNAL_WINDOW}")
    rows = split_list(args.priors, "--priors")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"--priors: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.points is not None and args.points < 1:
        raise UserError(f"--points {args.points}: must be >= 1")
    if args.reduction_factor is not None and args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor {args.reduction_factor:g}: must be > 1, e.g. 3")
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget {args.budget:g}: must be > 0 hours")
    rng = _floats(args.weight_range, "--weight-range")
    if rng is None or len(rng) != 2 or not 0 < rng[0] < rng[1]:
        raise UserError(f"--weight-range {args.weight_range}: expected LO,HI with 0 < LO < HI, e.g. 0.3,100")
    name = f"frontier-{args.preset}"
    base = base_config(args, name)
    swept = {KNOBS[knob_of(r)] for r in rows}
    for o in args.overrides:
        if o.split("=", 1)[0].strip() in swept:
            raise UserError(f"--set {o}: the frontier sweeps {o.split('=', 1)[0].strip()}; give its values with "
                            f"--weights / --kl-weights / --vf-weights")
    seeds = split_list(args.seeds, "--seeds", int)
    seed_reps = [{r: resolve(apply_overrides(base, {"prior.name": r, "run.seed": s})) for r in rows}
                 for s in seeds or [base.run.seed]]
    reps = seed_reps[0]
    model = trial_costs(reps, seed_reps)
    costs, used = measured_costs(model, reps, finished_manifests(args.reuse + args.merge, "--reuse/--merge"))
    grid = choose_grid(costs, len(seeds or [0]), args.budget, _floats(args.weights, "--weights"), args.points,
                       args.reduction_factor, (rng[0], rng[1]), asha=not args.no_asha)
    explicit = {"kl": _floats(args.kl_weights, "--kl-weights"), "vf": _floats(args.vf_weights, "--vf-weights")}
    grid_rows = {row_label(r, v): {"prior.name": r, KNOBS[knob_of(r)]: v}
                 for r in rows for v in knob_values(r, grid.weights, base, explicit)}
    if args.dry_run:
        planned = resolve_rows(base, grid_rows, seeds, weights=False)
        n_seeds = len(seeds or [0])
        model_note = (f"the FLOP model alone (dmvae_study.cost) says: every trial in full "
                      f"{expected_hours(model, len(grid.weights), None, n_seeds):.3g}, with ASHA "
                      f"{expected_hours(model, len(grid.weights), grid.eta, n_seeds):.3g}") if used else None
        print(plan_text(planned, grid, costs, args.budget, args.signal_window,
                        measured_text(used, model_note)))
        print(done_text(planned, costs, finished_already(planned, Path(base.run.out_dir) / name, args)))
        return None
    study = prepare(args, name, grid_rows)
    if study is None:
        return None
    if args.rerun_stopped:
        for label in study.rows:
            (study.root / "rows" / f"{label}.stopped.json").unlink(missing_ok=True)
    scheduler = None
    if grid.eta:
        info = {label: {"prior": c.prior.name, "seed": c.run.seed, "knob": knob_of(c.prior.name),
                        "weight": c.dmd.dm_weight,
                        "artifacts": {s: os.path.relpath(artifact(c, s).path, study.root) for s in plan(c)}}
                for label, c in study.rows.items()}
        groups = {label: None if c.prior.name in BASELINE_KNOB else (c.prior.name, c.run.seed)
                  for label, c in study.rows.items()}
        scheduler = PerPriorASHA(groups, {k: c.dmd.total_steps for k, c in study.rows.items()}, grid.eta,
                                 study.root, info, window=args.signal_window)
    stopped = [k for k in study.rows if stopped_record(study.root, k)]
    if stopped:
        print(f"note: {len(stopped)} row(s) were stopped by ASHA in an earlier run and are not run again "
              f"(--rerun-stopped runs them)", file=sys.stderr)
    caption = (f"Frontier ({args.preset}): DM weight {', '.join(f'{w:g}' for w in grid.weights)}"
               + (f", ASHA eta {grid.eta:g} per (prior, seed)" if grid.eta else ""))
    return run_study(study, "frontier", caption, scheduler=scheduler, trainable=trainable)


@cli
def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    return frontier(argv)


if __name__ == "__main__":
    main()
