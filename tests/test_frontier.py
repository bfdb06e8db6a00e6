"""The frontier study (studies/frontier.py) and its report (dmvae_study/report/frontier.py).

Fast: the ASHA test runs a stub pipeline (a deterministic function of the DM weight, no training) through
the study's own Tune path and per-prior scheduler on a local Ray; everything else runs without Ray.
"""

import math
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dmvae_study.report import frontier as fr
from dmvae_study.report import points
from studies import frontier as fs
from studies import frontier_budget as fb
from studies.common import UserError

BEST_WEIGHT = 3.0  # the stub pipeline's best DM weight


def stub_trial(config):
    """A row driver standing in for `studies.trials.row_trial`: reports the DMD stage's keys at steps 10, 20,
    30 with signal |log10(w / 3)| * ln 10 (loss/rec 1, match/swd 10^|log10(w/3)|), then a finished row."""
    import json
    from pathlib import Path

    from ray import tune

    from dmvae_study.config import ExperimentConfig
    from trainers.launch import write_manifest
    label = config["row"]
    cfg = ExperimentConfig.from_dict(config["rows"][label])
    w = cfg.dmd.dm_weight
    swd = 10 ** abs(math.log10(w / BEST_WEIGHT))
    for step in (10, 20, 30):
        tune.report({"dmd/step": step, "dmd/loss/rec": 1.0, "dmd/match/swd": swd})
    root = Path(cfg.run.out_dir) / cfg.run.name
    with open(root / "stub_calls.txt", "a") as fh:  # which rows ran to the end
        fh.write(json.dumps(label) + "\n")
    record = {"row": label, "prior": cfg.prior.name, "seed": cfg.run.seed, "psnr": 20 - math.log10(w),
              "gfid": 10 * abs(math.log10(w / BEST_WEIGHT)) + 5, "rfid": 1.0, "dm_weight": w, "status": "ok"}
    write_manifest(cfg, label, {}, 0.0, extra={"record": record})
    tune.report({**record, "row_done": 1})


def test_asha_stops_the_expected_weights_and_a_rerun_reuses(tmp_path, monkeypatch, capsys):
    import ray
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stub travels to the trial by value
    ray_tmp = tempfile.mkdtemp(prefix="rayf", dir="/tmp")  # short: Ray's socket paths stay under 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Sequential trials in grid order (max_concurrent_trials=1), eta 3, rungs at DMD steps 3, 9, 27 of 30:
    # w=1 is the first at every rung (continues), w=3 beats it (continues), w=10 and w=30 are worse than
    # the median of those before them at their first rung (stopped).
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--priors", "dinov2", "--weights", "1,3,10,30",
            "--reduction-factor", "3", "--set", "run.max_concurrent_trials=1"]
    try:
        df = fs.frontier(argv, trainable=stub_trial)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    status = df.set_index("row")["status"].to_dict()
    assert status == {"dinov2@dm=1": "ok", "dinov2@dm=3": "ok", "dinov2@dm=10": "stopped",
                      "dinov2@dm=30": "stopped"}
    root = tmp_path / "frontier-smoke"
    marker = fr_json(root / "rows" / "dinov2@dm=10.stopped.json")
    assert marker["record"]["stopped_at_step"] == 10 and marker["record"]["status"] == "stopped"
    assert pd.read_csv(root / "frontier.csv").set_index("row").loc["dinov2@dm=30", "status"] == "stopped"
    calls = (root / "stub_calls.txt").read_text().split()
    assert len(calls) == 2
    # re-invoked: finished and stopped rows come from their manifests; no trial runs, Ray does not start
    again = fs.frontier(argv, trainable=stub_trial)
    assert not ray.is_initialized()
    assert (root / "stub_calls.txt").read_text().split() == calls
    assert again.set_index("row")["status"].to_dict() == status
    # --dry-run says the same before anything runs: what its folder or a --merge part holds is not run again
    def dry(extra):
        assert fs.frontier(argv + ["--dry-run"] + extra) is None
        return capsys.readouterr().out
    assert "not run again): 4 of 4 trial(s)" in dry([]) and "still to run: 0 trial(s): nothing to train" in dry([])
    out = dry(["--rerun-stopped"])
    assert "2 of 4 trial(s)" in out and "still to run: 2 trial(s)" in out
    out = dry(["--out", str(tmp_path / "elsewhere"), "--merge", str(root)])
    assert "4 of 4 trial(s)" in out and "dinov2@dm=30: " in out and not (tmp_path / "elsewhere").exists()
    assert "0 of 4 trial(s)" in dry(["--out", str(tmp_path / "elsewhere")])

    # another study whose finished rows are the same computations (here: Table 1's `dinov2` row at the same
    # weight, as committed under docs/): --reuse takes them under this study's labels, and nothing runs
    other = tmp_path / "table1" / "rows"
    other.mkdir(parents=True)
    for w, label in ((1, "dinov2-s0"), (3, "dinov2-s1")):
        blob = fr_json(root / "rows" / f"dinov2@dm={w}.json")
        blob["row"] = blob["record"]["row"] = label
        (other / f"{label}.json").write_text(json_dumps(blob))
    (other / "dinov2-s1").mkdir()  # an archive
    (other / "dinov2-s1" / "samples.png").write_bytes(b"png")
    reuse = fs.frontier(["--preset", "smoke", "--out", str(tmp_path / "b"), "--priors", "dinov2", "--weights", "1,3",
                         "--reduction-factor", "3", "--reuse", str(other.parent)], trainable=stub_trial)
    assert not ray.is_initialized()
    assert reuse.set_index("row")["psnr"].to_dict() == {"dinov2@dm=1": 20.0, "dinov2@dm=3": 20 - math.log10(3)}
    got = fr_json(tmp_path / "b" / "frontier-smoke" / "rows" / "dinov2@dm=3.json")
    assert got["row"] == got["record"]["row"] == "dinov2@dm=3" and got["reused_from"].endswith("dinov2-s1.json")
    assert got["artifacts"] == fr_json(root / "rows" / "dinov2@dm=3.json")["artifacts"]  # same keys, same paths
    assert (tmp_path / "b" / "frontier-smoke" / "rows" / "dinov2@dm=3" / "samples.png").read_bytes() == b"png"


def json_dumps(blob):
    import json
    return json.dumps(blob)


def fr_json(path):
    import json
    return json.loads(path.read_text())


def test_scheduler_groups_by_prior_and_seed():
    """Trials of another prior never enter a prior's rungs: a bad weight of `gaussian` is compared only
    with `gaussian` trials (here: none before it), so it continues; baselines are not scheduled."""
    from ray.tune.schedulers import TrialScheduler

    class T:
        def __init__(self, row):
            self.config, self.trial_id = {"row": row}, row

    groups = {"a@dm=1": ("a", 0), "a@dm=3": ("a", 0), "b@dm=3": ("b", 0), "vae@kl=1e-06": None}
    s = fs.PerPriorASHA(groups, {k: 30 for k in groups}, 3.0, tempfile.mkdtemp(), {})
    res = lambda swd: {"dmd/step": 10, "dmd/loss/rec": 1.0, "dmd/match/swd": swd}
    for row in groups:
        s.on_trial_add(None, T(row))
    assert s.on_trial_result(None, T("a@dm=1"), res(1.0)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, T("b@dm=3"), res(100.0)) == TrialScheduler.CONTINUE  # own group: first
    assert s.on_trial_result(None, T("a@dm=3"), res(100.0)) == TrialScheduler.STOP
    assert s.on_trial_result(None, T("vae@kl=1e-06"), res(1e9)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, T("a@dm=1"), {"tokenizer/step": 5}) == TrialScheduler.CONTINUE
    assert s.metric is None  # Tune's strict metric check must not demand the signal in every result


@pytest.mark.parametrize("window, expected", [(1, "CONTINUE"), (2, "STOP")])
def test_rungs_compare_the_mean_signal_of_the_last_reports(tmp_path, window, expected):
    """Rungs at DMD steps 10, 30, 90; two reports per row before the first rung. w=3 is worse than w=1 on
    the mean of its two reports (log signals 3 and 0.5: mean 1.75 > 1) but better on the last one alone: a
    window of 2 stops it, a window of 1 keeps it. The stopped marker records both signals."""
    import json

    from ray.tune.schedulers import TrialScheduler

    class T:
        def __init__(self, row):
            self.config, self.trial_id = {"row": row}, row

    groups = {"a@dm=1": ("a", 0), "a@dm=3": ("a", 0)}
    (tmp_path / "rows").mkdir()
    s = fs.PerPriorASHA(groups, {k: 90 for k in groups}, 3.0, tmp_path, {}, window=window)
    res = lambda step, log_swd: {"dmd/step": step, "dmd/loss/rec": 1.0, "dmd/match/swd": math.exp(log_swd)}
    for row in groups:
        s.on_trial_add(None, T(row))
    assert fs.rung_steps(90, 3.0) == [10, 30, 90]
    assert s.on_trial_result(None, T("a@dm=1"), res(5, 1.0)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, T("a@dm=3"), res(5, 3.0)) == TrialScheduler.CONTINUE  # before the first rung
    assert s.on_trial_result(None, T("a@dm=1"), res(10, 1.0)) == TrialScheduler.CONTINUE  # first at the rung
    assert s.on_trial_result(None, T("a@dm=3"), res(10, 0.5)) == getattr(TrialScheduler, expected)
    if expected == "STOP":
        rec = json.loads((tmp_path / "rows" / "a@dm=3.stopped.json").read_text())["record"]
        assert rec["signal"] == pytest.approx(1.75) and rec["signal_last_report"] == pytest.approx(0.5)
        assert rec["signal_window"] == 2 and rec["stopped_at_step"] == 10


def test_replay_keeps_what_the_rungs_keep(tmp_path):
    """T 40, eta 2: rungs at 10, 20, 40, cutoff the median. Rung 10: a 1, b 0.5, c 2 -> a, b go on. Rung 20:
    on the last report a 1 < b 1.2 (a goes on); on the mean of two b (0.5 + 1.2) / 2 = 0.85 < a 1 (b goes on).
    The report's replay reads the same curves from the rows' archives."""
    from dmvae_study import asha
    logs = {"a": [1.0, 1.0, 1.0, 1.0], "b": [0.5, 1.2, 1.2, 1.2], "c": [2.0, 2.0, 2.0, 2.0]}
    curves = {r: [{"dmd/step": 10 * (i + 1), "dmd/loss/rec": 1.0, "dmd/match/swd": math.exp(v)}
                  for i, v in enumerate(vals)] for r, vals in logs.items()}
    assert asha.rung_steps(40, 2.0) == [10, 20, 40]
    for window, winner in ((1, "a"), (2, "b")):
        lines = asha.replay(curves, 40, 2.0, window)
        first = lines[lines["rung"] == 10].set_index("row")
        assert first["kept"].to_dict() == {"a": True, "b": True, "c": False}
        assert first.loc["a", "cutoff"] == pytest.approx(1.0)
        second = lines[lines["rung"] == 20].set_index("row")
        assert second["kept"].to_dict() == {"a": winner == "a", "b": winner == "b"}
        assert second.loc["b", "value"] == pytest.approx(1.2 if window == 1 else 0.85)
        assert lines[lines["rung"] == 40]["row"].tolist() == [winner]
    # the Ray rule it mirrors: keep iff -value >= the (1 - 1/eta) quantile of the negated values
    vals = [0.3, 1.7, 0.9, 2.2, 1.1]
    assert asha.cutoff(vals, 3.0) == pytest.approx(-np.percentile([-v for v in vals], (1 - 1 / 3) * 100))

    import json
    rows = []
    for i, (r, vals) in enumerate(logs.items()):
        label = f"dinov2@dm={[1, 3, 10][i]}-s0"
        (tmp_path / "rows" / label / "curves").mkdir(parents=True)
        jsonl = [{"stage": "dmd", "step": 10 * (k + 1), "loss/rec": 1.0, "match/swd": math.exp(v)}
                 for k, v in enumerate(vals)]
        (tmp_path / "rows" / label / "curves" / "dmd.jsonl").write_text("\n".join(map(json.dumps, jsonl)))
        rows.append({"row": label, "seed": 0, "status": "ok", "gfid": [7.0, 5.0, 9.0][i], "psnr": 20.0})
    got = fr.asha_replay(tmp_path, fr.frontier_frame(pd.DataFrame(rows)), 2.0, (1, 2))
    last = got[got["rung"] == 40]
    assert last.set_index("window")["weight"].to_dict() == {1: 1.0, 2: 3.0}
    text = "\n".join(fr.replay_text(got, pd.DataFrame({"prior": ["dinov2"], "weight": [3.0]}), 2.0))
    assert "window 1: 3 weights replayed, kept through the last rung (step 40): 1; best gFID of this seed at " \
           "weight 3 (stopped); matched pick 3 (stopped)" in text
    assert "window 2: 3 weights replayed, kept through the last rung (step 40): 3; best gFID of this seed at " \
           "weight 3 (kept); matched pick 3 (kept)" in text


def test_signal():
    assert fs.signal({"dmd/step": 10, "dmd/loss/rec": 2.0, "dmd/match/swd": 3.0}) == pytest.approx(math.log(6.0))
    assert fs.signal({"dmd/step": 10, "dmd/loss/rec": 0.0, "dmd/match/swd": 3.0}) is None
    assert fs.signal({"tokenizer/step": 10, "dmd/loss/rec": 1.0, "dmd/match/swd": 3.0}) is None


def synthetic_frame():
    """Two priors x three weights x three seeds, and the beta-VAE at three KL weights."""
    rng = np.random.default_rng(0)
    rows = []
    truth = {  # (prior, weight) -> (psnr, gfid)
        ("dinov2", 1.0): (26.0, 9.0), ("dinov2", 10.0): (24.5, 5.0), ("dinov2", 100.0): (21.0, 3.0),
        ("gaussian", 1.0): (25.5, 12.0), ("gaussian", 10.0): (23.0, 7.0), ("gaussian", 100.0): (20.0, 6.5),
        ("vae", 1e-7): (26.2, 20.0), ("vae", 1e-6): (25.0, 18.0), ("vae", 1e-5): (23.5, 17.0)}
    for (prior, w), (psnr, gfid) in truth.items():
        for seed in range(3):
            rows.append({"row": f"{fr.row_label(prior, w)}-s{seed}", "prior": prior, "seed": seed,
                         "psnr": psnr + rng.normal(0, 0.2), "gfid": gfid + rng.normal(0, 0.3),
                         "rfid": 1 + rng.normal(0, 0.1), "status": "ok"})
    rows.append({"row": "gaussian@dm=100-s3", "prior": "gaussian", "status": "stopped"})
    return pd.DataFrame(rows)


def test_matched_table_picks_the_best_feasible_weight():
    df = synthetic_frame()
    summary = fr.summarise(fr.frontier_frame(df))
    floor, why = fr.psnr_floor(summary, 1.0, "vae", 1e-6)
    vae = df[df["row"].str.startswith("vae@kl=1e-06")]["psnr"]
    assert floor == pytest.approx(vae.mean() - 1.0) and "vae@kl=1e-06" in why
    m = fr.matched_table(summary, floor).set_index("prior")
    # floor ~24: dinov2's w=100 (gFID 3) has PSNR 21, infeasible; w=10 (24.5) is the best feasible
    assert m.loc["dinov2", "weight"] == 10.0 and m.loc["dinov2", "feasible"] == 2
    assert m.loc["gaussian", "weight"] == 1.0  # only w=1 clears the floor
    assert m.loc["vae", "weight"] == 1e-6
    # intervals: a direct Student-t computation over the three seeds
    g = df[df["row"].str.startswith("dinov2@dm=10-")]["gfid"].to_numpy()
    half = sps.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / math.sqrt(len(g))
    assert m.loc["dinov2", "gfid_mean"] == pytest.approx(g.mean())
    assert m.loc["dinov2", "gfid_lo"] == pytest.approx(g.mean() - half)
    assert m.loc["dinov2", "gfid_hi"] == pytest.approx(g.mean() + half)
    lo, hi = sps.t.interval(0.95, len(g) - 1, loc=g.mean(), scale=sps.sem(g))
    assert (m.loc["dinov2", "gfid_lo"], m.loc["dinov2", "gfid_hi"]) == pytest.approx((lo, hi))
    # a floor nobody meets: every prior listed, none picked
    none = fr.matched_table(summary, 99.0)
    assert none["weight"].isna().all() and set(none["prior"]) == {"dinov2", "gaussian", "vae"}
    # Pareto: for dinov2 every weight trades PSNR for gFID (all on the front)
    assert summary[summary["prior"] == "dinov2"]["pareto"].all()
    assert summary.set_index("point").loc["gaussian@dm=100", "stopped"] == 1


def test_report_files(tmp_path):
    root = tmp_path / "frontier-smoke"
    root.mkdir()
    synthetic_frame().to_csv(root / "frontier.csv", index=False)
    page = fr.build_frontier(root)
    out = page.parent
    for f in ("matched.csv", "matched.md", "frontier_summary.csv", "frontier_tradeoff.png", "frontier_pareto.png"):
        assert (out / f).stat().st_size > 0, f
    m = pd.read_csv(out / "matched.csv").set_index("prior")
    assert m.loc["dinov2", "weight"] == 10.0  # the smoke preset's default kl_weight 1e-6 sets the floor
    assert "nothing to replay" in page.read_text()  # no archived DMD curves in a bare frontier.csv
    assert fr.main([str(tmp_path / "nothing")]) == 2


def test_dry_run_prints_the_plan_and_cost_without_ray(tmp_path, capsys):
    import ray
    assert fs.frontier(["--preset", "smoke", "--out", str(tmp_path), "--priors", "dinov2,vae", "--dry-run",
                        "--seeds", "0,1"]) is None
    out = capsys.readouterr().out
    assert not ray.is_initialized() and not (tmp_path / "frontier-smoke").exists()
    for w in ("0.3", "1", "3", "10", "30", "100"):
        assert f"dinov2@dm={w}-s1" in out
    assert "vae@kl=1e-06-s0" in out and "baseline.kl_weight=1e-06" in out  # the default sits at DM weight 10
    assert "reduction factor 3" in out and "CPU core-hours" in out and " core-h " in out  # cost.dry_run_report
    # weight 0 is the no-DM control (the joint stage trains on reconstruction alone): a point like any other
    fs.frontier(["--preset", "smoke", "--out", str(tmp_path), "--priors", "dinov2", "--dry-run", "--weights", "0,1"])
    out = capsys.readouterr().out
    assert "dinov2@dm=0 " in out and "dmd.dm_weight=0" in out and "DM weights 0, 1" in out


def test_grid_and_budget_rule():
    assert fb.log_grid(0.3, 100, 6) == [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
    costs = fb.Costs(unit="h", shared=10.0, dmd={"a": 1.0, "b": 1.0}, post={"a": 4.0, "b": 4.0},
                     baseline={"vae": 2.0})
    frac, surv = fb.dmd_trial_equivalents(6, 3.0)
    assert frac == pytest.approx(6 / 9 + 2 * (1 / 3 - 1 / 9) + 1 * (1 - 1 / 3)) and surv == 1.0
    assert fb.expected_hours(costs, 6, None, 1) == 10 + 2 * 6 * 5 + 6 * 2
    assert fb.expected_hours(costs, 6, 3.0, 2) == pytest.approx(10 + 2 * (2 * (frac + 4) + 12))
    # no budget: the default grid, eta 3
    g = fb.choose_grid(costs, 1, None)
    assert g.weights == list(fb.DEFAULT_WEIGHTS) and g.eta == 3.0
    # a large budget: the largest grid with the gentlest eta
    big = fb.choose_grid(costs, 1, 1e6)
    assert len(big.weights) == 12 and big.eta == 2.0
    # each plan the rule returns fits, and the next larger grid would not fit with any eta
    for budget in (60.0, 75.0, 90.0):
        g = fb.choose_grid(costs, 1, budget)
        assert g.expected <= budget
        n = len(g.weights)
        larger = [k for k in fb.CANDIDATE_POINTS if k > n]
        if larger:
            assert all(fb.expected_hours(costs, min(larger), e, 1) > budget for e in fb.CANDIDATE_ETAS)
        assert all(fb.expected_hours(costs, n, e, 1) > budget for e in fb.CANDIDATE_ETAS if e < g.eta)
    with pytest.raises(UserError, match="raise --budget to at least"):
        fb.choose_grid(costs, 1, 5.0)
    # ASHA builds all three rungs, the last at (or just before) the end of DMD
    for t in (30, 600, 3000, 300_000):
        for eta in fb.CANDIDATE_ETAS:
            steps = fs.rung_steps(t, eta)
            assert len(steps) == 3 and steps[-1] <= t and steps[-1] > t / eta


def test_measured_costs_take_the_median_of_rows_doing_the_same_work(tmp_path):
    """A stage's measured cost: the median wall time x cores over finished rows whose stage has the planned
    FLOP count; a row at other sizes (more DMD and refinement steps) and a stage taken from the store (0 s) do not count;
    an unmeasured stage keeps the FLOP model's value."""
    import json

    from dmvae_study.configlib import apply_overrides
    from dmvae_study.cost import hours, stage_cost
    from dmvae_study.pipeline import resolve
    from dmvae_study.presets import preset
    rep = resolve(apply_overrides(preset("smoke"), {"prior.name": "dinov2", "run.cpus_per_worker": 2.0}))
    model = fb.trial_costs({"dinov2": rep})
    longer = resolve(apply_overrides(preset("smoke"), {"prior.name": "gaussian", "dmd.total_steps": 99,
                                                          "refine.total_steps": 3}))
    rows = [(rep, {"dmd": 1800.0, "refine": 0.0}), (rep, {"dmd": 3600.0}), (rep, {"dmd": 5400.0}),
            (longer, {"dmd": 1e6, "refine": 1e6})]
    paths = []
    for i, (cfg, walls) in enumerate(rows):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"config": cfg.to_dict(),
                                         "summaries": {k: {"wall_s": v} for k, v in walls.items()}}))
    (tmp_path / "bad.json").write_text("{}")
    costs, used = fb.measured_costs(model, {"dinov2": rep}, paths + [tmp_path / "bad.json"])
    assert fb.trial_resources(rep) == 2.0
    assert costs.dmd["dinov2"] == pytest.approx(2 * 3600.0 / 3600.0)  # median 3600 s x 2 cores
    assert used == {("dinov2", "dmd"): (pytest.approx(2.0), 3)}
    assert costs.post["dinov2"] == pytest.approx(model.post["dinov2"])  # refine's 0 s is no measurement
    assert costs.shared == model.shared
    assert model.dmd["dinov2"] == pytest.approx(hours(stage_cost(rep, "dmd")["flops"], False))


def test_measured_costs_prefer_rows_run_under_the_planned_allocator_setting(tmp_path):
    """Rows written before `run.keep_freed_memory` existed (no key: glibc's default, off) measured a trial's
    stages at about twice today's time; a plan with the setting on takes the median of the rows run with it,
    a plan with it off the median of the others, and with no row of the planned setting every row counts."""
    import json

    from dmvae_study.configlib import apply_overrides
    from dmvae_study.pipeline import resolve
    from dmvae_study.presets import preset

    def rep_with(keep: bool):
        return resolve(apply_overrides(preset("smoke"), {"prior.name": "dinov2", "run.cpus_per_worker": 1.0,
                                                          "run.keep_freed_memory": keep}))

    def write(name: str, keep: bool | None, dmd_s: float):
        blob = rep_with(bool(keep)).to_dict()
        if keep is None:
            del blob["run"]["keep_freed_memory"]
        (tmp_path / name).write_text(json.dumps({"config": blob, "summaries": {"dmd": {"wall_s": dmd_s}}}))
        return tmp_path / name

    old = [write(f"old{i}.json", None, s) for i, s in enumerate((3600.0, 5400.0, 7200.0))]
    new = [write(f"new{i}.json", True, s) for i, s in enumerate((1800.0, 2700.0))]
    on, off = rep_with(True), rep_with(False)
    model = fb.trial_costs({"dinov2": on})
    costs, used = fb.measured_costs(model, {"dinov2": on}, old + new)
    assert costs.dmd["dinov2"] == pytest.approx(2250.0 / 3600.0) and used[("dinov2", "dmd")][1] == 2
    costs, used = fb.measured_costs(model, {"dinov2": off}, old + new)
    assert costs.dmd["dinov2"] == pytest.approx(1.5) and used[("dinov2", "dmd")][1] == 3
    costs, used = fb.measured_costs(model, {"dinov2": on}, old)
    assert costs.dmd["dinov2"] == pytest.approx(1.5) and used[("dinov2", "dmd")][1] == 3


def test_dm_weight_is_not_in_the_shared_stages_keys():
    """Weights reuse the tokenizer, reference set and teacher; DMD and everything after differ."""
    from dmvae_study.presets import preset
    from dmvae_study.pipeline import artifact, resolve
    a = resolve(preset("smoke", {"dmd.dm_weight": 1.0, "prior.name": "gaussian"}))
    b = resolve(preset("smoke", {"dmd.dm_weight": 30.0, "prior.name": "gaussian"}))
    for stage in ("tokenizer", "reference", "teacher"):
        assert artifact(a, stage).path == artifact(b, stage).path, stage
    for stage in ("dmd", "refine", "latents", "generator", "eval"):
        assert artifact(a, stage).path != artifact(b, stage).path, stage


def test_bad_flags(tmp_path):
    base = ["--preset", "smoke", "--out", str(tmp_path), "--priors", "dinov2", "--dry-run"]
    with pytest.raises(UserError, match="sweeps dmd.dm_weight"):
        fs.frontier(base + ["--set", "dmd.dm_weight=3"])
    with pytest.raises(UserError, match="--weight-range"):
        fs.frontier(base + ["--weight-range", "100,0.3"])
    with pytest.raises(UserError, match="reduction-factor"):
        fs.frontier(base + ["--reduction-factor", "1"])
    with pytest.raises(UserError, match="--signal-window 0: must be >= 1"):
        fs.frontier(base + ["--signal-window", "0"])


def test_dry_run_counts_every_planned_seeds_shared_work(tmp_path, capsys):
    """Each seed trains its own tokenizer, reference sets and teachers: a plan over seeds 1 and 2 prices two
    seeds' shared work and shows those seeds' stage plans, not the base config's seed 0 alone."""
    def shared(seeds):
        fs.frontier(["--preset", "smoke", "--out", str(tmp_path), "--priors", "dinov2,gaussian", "--dry-run",
                     "--seeds", seeds, "--weights", "1,10"])
        out = capsys.readouterr().out
        return float(out.split("shared work ")[1].split(";")[0]), out
    one, out1 = shared("1")
    two, out2 = shared("1,2")
    assert one > 0 and two == pytest.approx(2 * one, rel=1e-3)
    # the stage plan is of one planned trial per row and seed (its first weight): that trial's own artifacts
    assert "row dinov2@dm=1-s1 (prior dinov2, seed 1)" in out1 and "seed 0" not in out1.split("stage plan")[1]
    assert "row gaussian@dm=1-s2 (prior gaussian, seed 2)" in out2 and "@dm=10" not in out2.split("stage plan")[1]
    # the tokenizer is shared by the rows of one seed, not across seeds
    plan2 = out2.split("stage plan")[1]
    assert plan2.count("tokenizer  to train") == 2 and plan2.count("tokenizer  shared with a row above") == 2


def test_tradeoff_error_bars_are_one_standard_error_over_seeds():
    """The plot's bars are std / sqrt(n) of each point's seeds (none for one seed), not the tables' 95% t
    intervals, which for two seeds are 12.7 standard errors wide."""
    g = pd.DataFrame({"n": [1, 2, 3], "gfid_std": [np.nan, 2.0, 3.0], "gfid_mean": [60.0, 62.0, 64.0],
                      "gfid_lo": [np.nan, 0.0, 0.0], "gfid_hi": [np.nan, 99.0, 99.0]})
    np.testing.assert_allclose(fr._err(g, "gfid"), [0.0, 2.0 / math.sqrt(2), 3.0 / math.sqrt(3)])
    assert fr._err(g.iloc[:1], "gfid") is None
    # through the report's own summary of per-seed rows, against scipy's standard error of the mean
    seeds = {"dinov2@dm=1": [58.0, 61.0], "dinov2@dm=3": [60.0, 66.0, 63.5], "dinov2@dm=10": [65.0]}
    table = pd.DataFrame([{"row": f"{p}-s{i}", "gfid": v, "psnr": 24.0 + i, "rfid": 50.0 + v / 10}
                          for p, vs in seeds.items() for i, v in enumerate(vs)])
    summary = fr.summarise(table)
    got = dict(zip(summary["point"], fr._err(summary, "gfid")))
    for p, vs in seeds.items():
        assert got[p] == pytest.approx(sps.sem(vs) if len(vs) > 1 else 0.0), p


def test_ranking_says_which_pairs_the_matched_table_orders_differently_from_the_heuristic(tmp_path):
    """Semantic (data-derived: heuristic weight 10) is best at weight 1, which the heuristic never runs; the
    Gaussian's heuristic point is its weight 1. Matched, semantic comes first; by the heuristic, the Gaussian:
    the page names the swap and both gFID differences with Welch intervals (scipy's, independently)."""
    seeds = {("dinov2", 10.0): ([10.0, 11.0, 12.5], 22.0), ("dinov2", 1.0): ([8.0, 9.0], 25.0),
             ("gaussian", 1.0): ([9.5, 9.0, 9.7], 25.0), ("gaussian", 0.3): ([13.0], 26.0),
             ("vae", 1e-6): ([20.0, 21.0, 19.0], 24.5)}
    table = pd.DataFrame([{"row": f"{fr.row_label(p, w)}-s{i}", "prior": p, "seed": i, "gfid": g, "psnr": psnr,
                           "rfid": 1.0, "status": "ok"}
                          for (p, w), (gs, psnr) in seeds.items() for i, g in enumerate(gs)])
    heuristic = fr.heuristic_weights(["dinov2", "gaussian", "vae"], {"vae": 1e-6})
    assert heuristic == {"dinov2": 10.0, "gaussian": 1.0, "vae": 1e-6}
    frame = fr.frontier_frame(table)
    matched = fr.matched_table(fr.summarise(frame), 23.0)
    assert list(matched["prior"]) == ["dinov2", "gaussian", "vae"] and matched["weight"].tolist()[:2] == [1.0, 1.0]
    rk = fr.ranking(frame, matched, heuristic).set_index(["a", "b"])
    assert rk["same_order"].tolist() == [False, True, True]  # (dinov2, gaussian), (dinov2, vae), (gaussian, vae)
    r = rk.loc[("dinov2", "gaussian")]
    for tag, x, y in (("m", [8.0, 9.0], [9.5, 9.0, 9.7]), ("h", [10.0, 11.0, 12.5], [9.5, 9.0, 9.7])):
        ci = sps.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
        assert r[f"{tag}_diff"] == pytest.approx(np.mean(x) - np.mean(y))
        assert (r[f"{tag}_lo"], r[f"{tag}_hi"]) == pytest.approx((ci.low, ci.high))
        assert r[f"{tag}_resolved"] == bool(ci.low > 0 or ci.high < 0)
        n = min(len(x), len(y))  # paired by seed: seeds 0..n-1 are the ones both points have
        ci = sps.ttest_rel(x[:n], y[:n]).confidence_interval(0.95)
        assert r[f"{tag}_paired_seeds"] == n
        assert r[f"{tag}_paired_diff"] == pytest.approx(np.mean(np.subtract(x[:n], y[:n])))
        assert (r[f"{tag}_paired_lo"], r[f"{tag}_paired_hi"]) == pytest.approx((ci.low, ci.high))
    lines = "\n".join(fr.ranking_text(rk.reset_index(), matched, frame, heuristic))
    assert "**dinov2 and gaussian swap places.**" in lines and lines.count("swap places") == 1
    assert "dinov2 @ 1 (8.5, 2 seeds), gaussian @ 1 (9.4, 3 seeds)" in lines
    assert "gaussian @ 1 (9.4, 3 seeds), dinov2 @ 10 (11.2, 3 seeds)" in lines
    # one seed on a side: a difference, no interval, never resolved
    one = fr.ranking(frame, matched.assign(weight=[1.0, 0.3, 1e-6]), heuristic).set_index(["a", "b"])
    assert one.loc[("dinov2", "gaussian"), "m_diff"] == pytest.approx(8.5 - 13.0)
    assert math.isnan(one.loc[("dinov2", "gaussian"), "m_lo"]) and not one.loc[("dinov2", "gaussian"), "m_resolved"]
    assert one.loc[("dinov2", "gaussian"), "m_paired_seeds"] == 1  # gaussian @ 0.3 has seed 0 alone
    assert one.loc[("dinov2", "gaussian"), "m_paired_diff"] == pytest.approx(8.0 - 13.0)
    # through the report: ranking.csv and the page's section
    root = tmp_path / "frontier-smoke"
    root.mkdir()
    table.to_csv(root / "frontier.csv", index=False)
    page = fr.build_frontier(root, psnr_margin=1.5).read_text()  # floor 24.5 - 1.5 = 23
    assert "**dinov2 and gaussian swap places.**" in page
    assert len(pd.read_csv(root / "report" / "ranking.csv")) == 3


def test_each_point_is_compared_with_its_priors_table1_point_welch_and_paired(tmp_path):
    """`report.points`: every other weight of a prior minus its heuristic point (semantic: 10, Gaussian: 1),
    per metric, with Welch and paired-by-seed intervals that match scipy's; the points table lists each point's
    seeds and marks Table 1's point; the report writes both."""
    vals = {("dinov2", 10.0): ([64.0, 65.5, 62.8], [23.4, 23.9, 23.7]),
            ("dinov2", 1.0): ([62.6, 62.1], [24.9, 24.3]),
            ("dinov2", 100.0): ([66.5], [23.5]),
            ("gaussian", 1.0): ([68.9, 62.0, 59.0], [24.0, 23.6, 23.9]),
            ("gaussian", 0.3): ([63.1, 63.5, 60.0], [24.0, 23.8, 24.1])}
    table = pd.DataFrame([{"row": f"{fr.row_label(p, w)}-s{i}", "prior": p, "seed": i, "gfid": g, "psnr": q,
                           "rfid": 50.0, "matching_swd": 0.2 + 0.01 * i, "wall_s": 60.0 * (20 + i), "status": "ok"}
                          for (p, w), (gs, ps) in vals.items() for i, (g, q) in enumerate(zip(gs, ps))])
    frame = fr.frontier_frame(table)
    heuristic = fr.heuristic_weights(["dinov2", "gaussian"])
    ah = points.against_heuristic(frame, heuristic).set_index(["prior", "weight"])
    assert sorted(ah.index) == [("dinov2", 1.0), ("dinov2", 100.0), ("gaussian", 0.3)]
    for (p, w), base in ((("dinov2", 1.0), 10.0), (("gaussian", 0.3), 1.0)):
        r = ah.loc[(p, w)]
        assert r["heuristic_weight"] == base
        for k, m in enumerate(("gfid", "psnr")):
            x, y = vals[(p, w)][k], vals[(p, base)][k]
            ci = sps.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
            assert r[f"{m}_diff"] == pytest.approx(np.mean(x) - np.mean(y))
            assert (r[f"{m}_lo"], r[f"{m}_hi"]) == pytest.approx((ci.low, ci.high))
            assert r[f"{m}_resolved"] == bool(ci.low > 0 or ci.high < 0)
            n = min(len(x), len(y))
            ci = sps.ttest_rel(x[:n], y[:n]).confidence_interval(0.95)
            assert r[f"{m}_paired_seeds"] == n
            assert (r[f"{m}_paired_lo"], r[f"{m}_paired_hi"]) == pytest.approx((ci.low, ci.high))
            assert r[f"{m}_paired_resolved"] == bool(ci.low > 0 or ci.high < 0)
    # PSNR of semantic @ 1 minus @ 10 paired: +1.5 and +0.4 dB; seed 2 is absent at weight 1
    assert ah.loc[("dinov2", 1.0), "psnr_paired_diff"] == pytest.approx((1.5 + 0.4) / 2)
    one = ah.loc[("dinov2", 100.0)]  # one seed: a difference, no interval, never resolved
    assert one["gfid_diff"] == pytest.approx(66.5 - np.mean([64.0, 65.5, 62.8])) and math.isnan(one["gfid_lo"])
    assert not one["gfid_resolved"] and one["gfid_paired_seeds"] == 1
    text = "\n".join(points.against_text(ah.reset_index()))
    assert "| dinov2   | 100 - 10" in text and "(1 seed)" in text
    summary = fr.summarise(frame)
    shown = points.points_table(summary, frame, heuristic).set_index("point")
    assert shown.loc["dinov2@dm=10", "seeds"] == "0, 1, 2" and shown.loc["dinov2@dm=1", "seeds"] == "0, 1"
    assert shown.loc["dinov2@dm=10", "marks"].startswith("T1") and "T1" not in shown.loc["dinov2@dm=1", "marks"]
    assert shown.loc["dinov2@dm=10", "match SW"] == "0.200-0.220"
    assert shown.loc["dinov2@dm=10", "wall min per seed"] == "20, 21, 22"
    assert shown.loc["dinov2@dm=100", "gFID"] == "66.5"  # one seed: no interval
    root = tmp_path / "frontier-smoke"
    root.mkdir()
    table.to_csv(root / "frontier.csv", index=False)
    page = fr.build_frontier(root).read_text()
    assert "## Points" in page and "## Each point against its prior's Table 1 point" in page
    assert len(pd.read_csv(root / "report" / "against_heuristic.csv")) == 3


def test_held_out_picks_score_the_matched_rule_on_a_seed_it_did_not_see(tmp_path):
    """Leave one seed out: semantic@2 has the best three-seed mean (58), but with seed 2 held out weight 1's
    other seeds (50, 60) average 55 and win, and weight 1 scores 70 on seed 2. So the held-out scores are
    58, 58, 70 (mean 62, optimism +4 over the in-sample 58). Weight 3 has the lowest gFID but fails the PSNR
    floor everywhere and is never picked. The pairs are paired by held-out seed (scipy's interval)."""
    from dmvae_study.report import heldout
    seeds = {("dinov2", 1.0): ([50.0, 60.0, 70.0], 25.0), ("dinov2", 2.0): ([58.0, 58.0, 58.0], 25.0),
             ("dinov2", 3.0): ([1.0, 1.0, 1.0], 10.0), ("gaussian", 1.0): ([61.0, 62.0, 65.0], 25.0)}
    table = pd.DataFrame([{"row": f"{fr.row_label(p, w)}-s{i}", "prior": p, "seed": i, "gfid": g, "psnr": psnr,
                           "rfid": 1.0, "status": "ok"}
                          for (p, w), (gs, psnr) in seeds.items() for i, g in enumerate(gs)])
    frame = fr.frontier_frame(table)
    matched = fr.matched_table(fr.summarise(frame), 20.0)
    folds = heldout.held_out_folds(frame, 20.0).set_index(["prior", "held_out_seed"])
    assert folds.loc["dinov2", "pick"].tolist() == [2.0, 2.0, 1.0]
    assert folds.loc["dinov2", "gfid"].tolist() == [58.0, 58.0, 70.0]
    assert folds.loc["dinov2", "feasible"].tolist() == [2, 2, 2]
    summary = heldout.held_out_summary(folds.reset_index(), matched).set_index("prior")
    half = sps.t.ppf(0.975, 2) * np.std([58.0, 58.0, 70.0], ddof=1) / math.sqrt(3)
    assert summary.loc["dinov2", "gfid_mean"] == pytest.approx(62.0)
    assert (summary.loc["dinov2", "gfid_lo"], summary.loc["dinov2", "gfid_hi"]) == pytest.approx((62 - half, 62 + half))
    assert summary.loc["dinov2", "insample_gfid"] == pytest.approx(58.0)
    assert summary.loc["dinov2", "optimism"] == pytest.approx(4.0)
    assert summary.loc["gaussian", "optimism"] == pytest.approx(0.0)  # one value: nothing to pick
    pairs = heldout.held_out_pairs(folds.reset_index(), ["dinov2", "gaussian"]).iloc[0]
    ci = sps.ttest_rel([58.0, 58.0, 70.0], [61.0, 62.0, 65.0]).confidence_interval(0.95)
    assert pairs["diff"] == pytest.approx(np.mean([-3.0, -4.0, 5.0]))
    assert (pairs["lo"], pairs["hi"]) == pytest.approx((ci.low, ci.high)) and not pairs["resolved"]
    # a seed missing the pick scores nothing for that fold; one seed alone is not held out
    partial = frame[frame["row"] != f"{fr.row_label('dinov2', 1.0)}-s2"]
    f2 = heldout.held_out_folds(partial, 20.0).set_index(["prior", "held_out_seed"])
    assert math.isnan(f2.loc[("dinov2", 2), "gfid"]) and f2.loc[("dinov2", 2), "pick"] == 1.0
    assert heldout.held_out_folds(frame[frame["row"].str.endswith("-s0")], 20.0).empty
    root = tmp_path / "frontier-smoke"
    root.mkdir()
    table.to_csv(root / "frontier.csv", index=False)
    page = fr.build_frontier(root).read_text()  # no beta-VAE row: no PSNR floor, so weight 3 is picked
    assert "## Matched picks out of sample (leave one seed out)" in page and "| dinov2   | 3, 3, 3" in page
    assert len(pd.read_csv(root / "report" / "held_out.csv")) == 6
