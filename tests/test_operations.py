"""Operations, as a user meets them: a study run from another working directory with a relative `--out`
lands under `<out>/<study>/`, its report opens, TensorBoard sees every stage, a changed `generator.*`
retrains only what follows it, `--restart` retrains nothing, a failed row fails the study loudly, and
`--dry-run` plans the paper's setting without Ray or data."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.micro import micro, set_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
MICRO = micro("generator.eval_every=2", "eval.gfid_samples=20", "run.log_every=2")


def study(cwd: Path, *args: str, check: bool = True, sets: list[str] = MICRO) -> subprocess.CompletedProcess:
    """`python studies/table1.py ...` as a user runs it, from `cwd` (not the repository)."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "DMVAE_NO_PROGRESS": "1"}
    cmd = [sys.executable, str(ROOT / "studies" / "table1.py"), *args, *set_args(sets)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def done_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("store/*/*/DONE")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A two-row micro study run from an unrelated working directory with the relative `--out results`."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    study(cwd, "--priors", "vae,gaussian", "--out", "results")
    return cwd


def test_relative_out_keeps_every_artifact_under_the_study(finished):
    root = finished / "results" / "table1-smoke"
    assert sorted(p.name for p in (root / "rows").glob("*.json")) == ["gaussian.json", "vae.json"]
    for row in ("vae", "gaussian"):
        m = json.loads((root / "rows" / f"{row}.json").read_text())
        for stage, rel in m["artifacts"].items():
            assert (root / rel / "DONE").exists(), (row, stage, rel)  # inside <out>/<study>, not Ray's session dir
        assert (root / "logs" / f"{row}.log").read_text().count("img/s") >= 4  # progress lines, per stage
    assert m["derived"]["dm_weight"] == 1.0 and m["seed"] == 0
    table = pd.read_csv(root / "table1.csv")
    assert list(table["row"]) == ["vae", "gaussian"] and (table["status"] == "ok").all()
    assert {"dm_weight", "cfg_scale", "timestep_schedule", "score_net_size"} <= set(table.columns)
    md = (root / "table1.md").read_text()
    assert "DM weight" in md and "score net" in md


def test_report_from_the_readme_command(finished):
    proc = subprocess.run([sys.executable, "-m", "dmvae_study.report", "results/table1-smoke"], cwd=finished,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = finished / "results" / "table1-smoke" / "report"
    assert (report / "report.md").exists() and (report / "report.html").exists()
    pngs = {p.name for p in report.rglob("*.png")}
    assert {"curves_tokenizer.png", "curves_dmd.png", "curves_generator.png", "fig4_tsne.png"} <= pngs, pngs
    assert "no latent cache" not in (report / "report.md").read_text()


def test_gfid_redraw_with_the_study_noise_reproduces_the_row(finished):
    """benchmarks/gfid_sampling_noise.py: its first draw uses the study's own noise offset, so it must give
    the row's reported gFID exactly; the others are other draws of the same generator."""
    root = finished / "results" / "table1-smoke"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gfid_sampling_noise", str(root), "--rows", "gaussian",
                           "--draws", "2", "--threads", "1"], cwd=ROOT, env={**os.environ, "DMVAE_NO_PROGRESS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])["gaussian"]
    record = json.loads((root / "rows" / "gaussian.json").read_text())["record"]
    n = str(record["gfid_samples"])
    assert out[n]["values"][0] == record["gfid"] and out[n]["values"][1] != record["gfid"]


def test_tensorboard_sees_every_stage(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((finished / "results" / "table1-smoke").rglob("events.out.tfevents.*"))
    assert len(events) == 2
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for stage_metric in ("tokenizer/loss/rec", "teacher/loss/fm", "dmd/loss/fake", "dmd/match/swd",
                         "generator/loss/fm", "generator/eval/gfid_curve"):
        assert any(stage_metric in t for t in tags), (stage_metric, sorted(tags)[:20])


def test_changed_generator_retrains_only_what_follows_and_restart_retrains_nothing(finished):
    root = finished / "results" / "table1-smoke"
    before = done_files(root)
    longer = [s for s in MICRO if not s.startswith("generator.total_steps")] + ["generator.total_steps=6"]
    study(finished, "--priors", "vae,gaussian", "--out", "results", sets=longer)
    after = done_files(root)
    new = sorted(k.split("/")[1] for k in set(after) - set(before))
    assert new == ["eval", "eval", "generator", "generator"], new  # two rows: generator and eval each
    assert all(after[k] == v for k, v in before.items())            # nothing finished was touched
    again = done_files(root)
    study(finished, "--priors", "vae,gaussian", "--out", "results", "--restart", sets=longer)
    assert done_files(root) == again                                  # --restart reused the store


def test_a_failed_row_fails_the_study_and_the_rest_is_written(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": 0, "caption": "one caption"}) + "\n")  # every other id missing
    proc = study(tmp_path, "--priors", "vae,siglip_text", "--out", "res", check=False,
                 sets=[*MICRO, f"prior.captions={captions}", "run.max_failures=0"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "siglip_text: stage reference: MissingCaptionsError" in proc.stderr, proc.stderr[-3000:]
    assert "logs/siglip_text.log" in proc.stderr
    table = pd.read_csv(tmp_path / "res" / "table1-smoke" / "table1.csv")
    assert dict(zip(table["row"], table["status"])) == {"vae": "ok", "siglip_text": "failed"}


def test_dry_run_plans_the_paper_setting_without_ray_or_data(tmp_path):
    ray_dir = tmp_path / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir)}
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / "table1.py"), "--preset", "imagenet256",
                           "--out", str(tmp_path / "out"), "--dry-run", "--priors", "vae,dinov2",
                           "--set", "run.weights_dir=/nonexistent"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "row dinov2" in out and "dmd" in out and "H100-h" in out and "total to train" in out
    assert not ray_dir.exists() and not (tmp_path / "out").exists()


def test_seeds_in_parts_merge_and_intervals_match_a_direct_computation(tmp_path):
    """A study in two parts: seed 0, then seeds 0 and 1 with part 1's committed manifests merged in (from a
    copy elsewhere, as docs/ would hold them): part 2 runs only the seed-1 rows. The report's interval
    columns equal a direct Student-t computation over the two seeds."""
    import math
    import shutil

    from scipy import stats
    part1 = study(tmp_path, "--priors", "vae,gaussian", "--seeds", "0", "--out", "p1")
    assert "vae-s0" in part1.stdout
    committed = tmp_path / "committed"
    shutil.copytree(tmp_path / "p1" / "table1-smoke" / "rows", committed)
    for row in ("vae-s0", "gaussian-s0"):  # each finished row left its archive next to its manifest
        assert {p.name for p in (committed / row).iterdir()} == {"curves", "samples.png", "reconstructions.png",
                                                                 "tsne.npz"}
    shutil.rmtree(tmp_path / "p1")  # part 1's machine, and its artifact store, are gone
    part2 = study(tmp_path, "--priors", "vae,gaussian", "--seeds", "0,1", "--out", "p2", "--merge", str(committed))
    assert "2 row(s) already done" in part2.stderr and "vae-s0, gaussian-s0" in part2.stderr
    root = tmp_path / "p2" / "table1-smoke"
    assert (root / "rows" / "gaussian-s0" / "curves" / "dmd.jsonl").exists()  # --merge copied the archives
    assert len(list((root / "store" / "eval").glob("eval-*"))) == 2  # only the seed-1 rows were evaluated here
    rep = subprocess.run([sys.executable, "-m", "dmvae_study.report", str(root)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    seeds = pd.read_csv(root / "report" / "seeds.csv").set_index("row")
    table = pd.read_csv(root / "table1.csv")
    assert sorted(table["row"]) == ["gaussian-s0", "gaussian-s1", "vae-s0", "vae-s1"]
    for row in ("vae", "gaussian"):
        for m in ("gfid", "psnr", "rfid"):
            v = table.loc[table["row"].str.startswith(row + "-s"), m].to_numpy(float)
            half = stats.t.ppf(0.975, 1) * v.std(ddof=1) / math.sqrt(2)
            assert seeds.loc[row, "n"] == 2
            assert math.isclose(seeds.loc[row, f"{m}_mean"], v.mean(), rel_tol=1e-9)
            assert math.isclose(seeds.loc[row, f"{m}_lo"], v.mean() - half, rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(seeds.loc[row, f"{m}_hi"], v.mean() + half, rel_tol=1e-9, abs_tol=1e-9)
    pairs = pd.read_csv(root / "report" / "pairs.csv")
    assert len(pairs) == 1 and set(pairs.columns) >= {"diff", "lo", "hi", "resolved"}
    md = (root / "report" / "report.md").read_text()
    assert "Seeds and intervals" in md
    # part 1's rows are drawn from their archives: grids, curves, t-SNE panels
    for row in ("vae-s0", "gaussian-s0"):
        assert f"grids/{row}_samples.png" in md and (root / "report" / "grids" / f"{row}_samples.png").exists()
    assert "no eval image grids" not in md and "no latent cache" not in md and "no reference set" not in md
    assert "curves_dmd.png" in md and "fig4_tsne.png" in md
