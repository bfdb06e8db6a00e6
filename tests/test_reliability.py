"""Reliability: the platform survives worker loss, driver loss, non-finite losses and storage faults.

Fault-injection runs are smoke-sized (the teacher stage on a hand-made 96-sample reference set, or a
Table 1 study shrunk with `--set`). Each test checks that the fault really happened (marker file,
exit code, warning) and that the result equals an uninterrupted run where that is well defined.
Every Ray session gets its own short `RAY_TMPDIR` (unix-socket paths must stay short).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from dmvae_study.presets import preset
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import load_torch
from dmvae_study.pipeline import artifact, resolve
from tests.micro import micro, set_args
from trainers import teacher
from trainers.common import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A unique, short RAY_TMPDIR for this test (and no progress bars); removed afterwards."""
    d = tempfile.mkdtemp(prefix="ray-rel-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _teacher_cfg(out, *extra):
    return resolve(preset("smoke", [f"run.out_dir={out}", "teacher.total_steps=12", "teacher.batch_size=32",
                                    "run.checkpoint_every=4", "run.log_every=2", *extra]))


def _reference(cfg, nan_rows=()):
    """96 standardised (4, 4, 4) samples with labels; `nan_rows` are set to NaN after standardising."""
    g = torch.Generator().manual_seed(0)
    ref = ReferenceSet.standardised(torch.randn(96, 4, 4, 4, generator=g), torch.randint(0, 10, (96,), generator=g),
                                    num_classes=10)
    for i in nan_rows:
        ref.x[i] = float("nan")
    art = artifact(cfg, "reference")
    ref.save(art, 64)
    art.mark_done({"count": 96})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """EMA weights of an uninterrupted 1-worker, 8-step teacher run (a 2-worker run at the same global
    batch is the same: tests/test_ddp.py); checkpointing does not change the numbers."""
    cfg = _teacher_cfg(tmp_path_factory.mktemp("uninterrupted"), "teacher.total_steps=8")
    _reference(cfg)
    os.environ.setdefault("DMVAE_NO_PROGRESS", "1")
    teacher.train_loop(cfg)
    return load_torch(artifact(cfg, "teacher").file("teacher.pt"))


def _metrics(art):
    return [json.loads(line) for line in art.file("metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].dtype.is_floating_point)


class _WorkerDied(BaseException):
    """Stands in for `os._exit(17)` of the fault injection, so a test can kill a stage in-process."""


def _exit_raises(monkeypatch):
    def fake_exit(code):
        raise _WorkerDied(code)
    monkeypatch.setattr(os, "_exit", fake_exit)


# ---- 1. worker loss ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_worker_loss_restarts_from_checkpoint_and_matches_uninterrupted(tmp_path, ray_tmpdir, uninterrupted):
    """A 2-worker Ray Train teacher run loses its last worker at step 5 (`os._exit(17)`); Ray's
    FailureConfig restarts the group, every stage resumes from its step-4 checkpoint, and the final
    EMA weights equal an uninterrupted run (data order, t, eps and label drops are functions of
    (seed, step), so the replayed steps are the same)."""
    import ray

    from trainers.launch import run_pipeline
    faulty = _teacher_cfg(tmp_path, "teacher.total_steps=8", "run.checkpoint_every=2", "run.num_workers=2",
                          "run.fail_at_step=5", "run.max_failures=1")
    _reference(faulty)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmpdir)
    try:
        run_pipeline(faulty, stages=["teacher"], force_ray=True)
    finally:
        ray.shutdown()
    art = artifact(faulty, "teacher")
    assert art.done
    assert art.file(".fault-injected-teacher").exists(), "the injected worker loss did not fire"
    records = _metrics(art)
    # steps 2, 4 logged by the first attempt; the restart resumed from the step-4 checkpoint
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r["resumed_from"] for r in records] == [0, 0, 4, 4]
    worst = _max_diff(load_torch(art.file("teacher.pt")), uninterrupted)
    assert worst < 1e-5, f"resumed run differs from the uninterrupted one by {worst}"


# ---- 2. driver loss ----------------------------------------------------------------------------------

MICRO = micro("run.max_concurrent_trials=1")


def _done_mtimes(study: Path, row: str) -> dict[str, int]:
    """mtime_ns of the DONE marker (and teacher / tokenizer weights) of every artifact of a row."""
    manifest = json.loads((study / "rows" / f"{row}.json").read_text())
    out = {}
    for stage, rel in manifest["artifacts"].items():
        for name in ("DONE", "tokenizer.pt", "generator.pt", "teacher.pt"):
            p = study / rel / name
            if p.exists():
                out[f"{stage}/{name}"] = p.stat().st_mtime_ns
    return out


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (the test's own Ray session dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)  # ~2-3 min on a quiet 2-core machine; the bounds only catch a hang, even under 4x load
def test_driver_loss_study_resumes_with_the_same_command(tmp_path, ray_tmpdir):
    """SIGKILL the whole `table1.py` process group (driver, local Ray, trial workers) once the first
    row's manifest is written and the second row is mid-way (its teacher stage done); the same
    command then finishes the study (Tune restore): the finished row and the second row's finished
    stage are not re-trained (DONE / weight files untouched), and the table has both rows."""
    cmd = [sys.executable, "studies/table1.py", "--preset", "smoke", "--priors", "vae,gaussian",
           "--out", str(tmp_path), *set_args(MICRO)]
    env = {**os.environ, "DMVAE_NO_PROGRESS": "1", "RAY_TMPDIR": ray_tmpdir, "PYTHONUNBUFFERED": "1"}
    study = tmp_path / "table1-smoke"
    first_row = study / "rows" / "vae.json"
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 420
        teacher_done = study / "store" / "teacher"  # only the gaussian row has a teacher stage
        while not (first_row.exists() and any(teacher_done.glob("*/DONE"))):
            assert proc.poll() is None, f"study ended before the kill:\n{(tmp_path / 'run1.log').read_text()[-3000:]}"
            assert time.time() < deadline, "the study never reached the second row's teacher"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # driver loss, mid-way through the gaussian row
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (study / "table1.csv").exists() and not (study / "rows" / "gaussian.json").exists()
    time.sleep(2.0)
    for pid in _processes_mentioning(ray_tmpdir):  # Ray processes outside the group, if any: ours to end
        os.kill(pid, signal.SIGKILL)
    before = _done_mtimes(study, "vae")
    assert "eval/DONE" in before and "tokenizer/DONE" in before
    (teacher_art,) = [p.parent for p in teacher_done.glob("*/DONE")]
    teacher_before = {p.name: p.stat().st_mtime_ns for p in teacher_art.iterdir()}

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    table = pd.read_csv(study / "table1.csv")
    assert list(table["row"]) == ["vae", "gaussian"] and table["gfid"].notna().all()
    assert _done_mtimes(study, "vae") == before, "the finished row was re-trained"
    assert {p.name: p.stat().st_mtime_ns for p in teacher_art.iterdir()} == teacher_before, \
        "the interrupted row's finished teacher stage was re-trained"
    assert (study / "rows" / "gaussian.json").exists()
    assert not _processes_mentioning(ray_tmpdir) or time.sleep(5) or not _processes_mentioning(ray_tmpdir)


# ---- 3. non-finite losses ----------------------------------------------------------------------------

def test_nan_batches_are_skipped_and_counted(tmp_path, monkeypatch):
    """One NaN reference sample poisons one batch per epoch (3 batches of 32 out of 96): those
    updates are skipped and counted in `nonfinite/total`, the stage finishes with finite weights.
    (The DM gradient's own NaN safety is tests/test_dm_objectives.py::test_dm_nan_rows_do_not_poison_others.)"""
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    cfg = _teacher_cfg(tmp_path, "teacher.total_steps=9", "run.log_every=3")
    _reference(cfg, nan_rows=[17])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher.train_loop(cfg)
    art = artifact(cfg, "teacher")
    assert art.done
    records = _metrics(art)
    assert [r["nonfinite/total"] for r in records] == [1, 2, 3]  # once per epoch of 3 steps
    state = load_torch(art.file("teacher.pt"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.dtype.is_floating_point)


def test_consecutive_nonfinite_losses_stop_the_stage_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From step 6 on every loss is NaN: after `run.max_nonfinite=3` in a row the stage stops with
    NonFiniteLossError naming the fix; the last checkpoint (step 8, written between two skipped
    updates, so still finite) is kept, nothing is marked done, and once the cause is gone the same
    command resumes from it and finishes."""
    import trainers.flowfit as flowfit
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    cfg = _teacher_cfg(tmp_path, "teacher.total_steps=12", "run.max_nonfinite=3")
    _reference(cfg)
    real = flowfit.FlowMatchingLoss

    class NaNFromStep6(real):
        calls = 0

        def __call__(self, *a, **k):
            loss, t = super().__call__(*a, **k)
            type(self).calls += 1
            return (loss * float("nan") if type(self).calls > 6 else loss), t

    monkeypatch.setattr(flowfit, "FlowMatchingLoss", NaNFromStep6)
    with pytest.raises(NonFiniteLossError) as err:
        teacher.train_loop(cfg)
    msg = str(err.value)
    assert "3 consecutive non-finite losses" in msg and "last good checkpoint" in msg
    assert "Lower the learning rate" in msg and "run.max_nonfinite" in msg
    art = artifact(cfg, "teacher")
    assert not art.done and [s for s, _ in art.checkpoints()] == [4, 8]
    assert [(r["step"], r["nonfinite/total"]) for r in _metrics(art)][-2:] == [(6, 0), (8, 2)]
    step, state = art.load_latest_checkpoint()  # skipped steps left the weights as they were: finite
    assert step == 8 and all(torch.isfinite(v).all() for k in ("net", "ema") for v in state[k].values()
                             if v.dtype.is_floating_point)

    monkeypatch.setattr(flowfit, "FlowMatchingLoss", real)  # the cause is fixed: resume and finish
    out = teacher.train_loop(cfg)
    assert art.done and out["steps"] == 12 and _metrics(art)[-1]["resumed_from"] == 8


# ---- 4. storage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch, damage, uninterrupted):
    """A stage dies at step 7 (checkpoints 4 and 6 on disk); the step-6 checkpoint is then damaged.
    Rerunning the stage warns, resumes from step 4 and ends with the weights of an uninterrupted run."""
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    cfg = _teacher_cfg(tmp_path, "teacher.total_steps=8", "run.checkpoint_every=2", "run.fail_at_step=7")
    _reference(cfg)
    _exit_raises(monkeypatch)
    with pytest.raises(_WorkerDied):
        teacher.train_loop(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    art = artifact(cfg, "teacher")
    assert [s for s, _ in art.checkpoints()] == [4, 6] and art.file(".fault-injected-teacher").exists()
    newest = art.checkpoints()[-1][1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))  # a crash mid-copy / full disk
    else:
        data[len(data) // 2] ^= 0x55  # silent bit rot: only the checksum sees it
        newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"ckpt-000000006\.pt is unreadable .*previous good one"):
        teacher.train_loop(cfg)
    assert art.done
    assert [r["resumed_from"] for r in _metrics(art)][-1] == 4
    worst = _max_diff(load_torch(art.file("teacher.pt")), uninterrupted)
    assert worst < 1e-6, f"fallback run differs from the uninterrupted one by {worst}"


def test_unwritable_results_location_fails_before_training(tmp_path):
    """`--out` under a regular file (read-only works the same and also as root): a one-line error,
    exit code != 0, no traceback, and nothing started."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "studies/table1.py", "--priors", "vae", "--out", str(blocker / "res")],
                          cwd=ROOT, env={**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "not writable" in proc.stderr and "--out" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "ray").exists()  # Ray never started


def test_full_results_location_fails_before_training(tmp_path, monkeypatch, capsys):
    """A nearly full disk is found by the preflight: the CLI exits with the message, before Ray starts
    or any stage runs."""
    import shutil as _shutil

    import studies.trials as trials
    import trainers.launch as launch
    from studies import table1

    def never(*a, **k):
        raise AssertionError("training or Ray started despite a full results location")
    monkeypatch.setattr(trials, "init_ray", never)
    monkeypatch.setattr(launch, "run_pipeline", never)
    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(SystemExit) as e:
        table1.main(["--priors", "vae", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "MiB free" in err and "--out" in err


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_is_weights_only():
    """No code path unpickles arbitrary objects: every `torch.load` passes `weights_only=True`
    (checkpoints from a shared store or a downloaded weights file cannot run code)."""
    files = [p for d in ("dmvae_study", "priors", "trainers", "studies", "benchmarks", "scripts")
             for p in (ROOT / d).rglob("*.py")]
    assert files
    bad, seen = [], 0
    for f in files:
        for call in _torch_load_calls(f):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{f.relative_to(ROOT)}:{call.lineno}")
    assert seen >= 1 and not bad, f"torch.load without weights_only=True: {bad}"
    text = "\n".join(p.read_text() for p in files)
    assert not re.search(r"\bpickle\.loads?\(|torch\.jit\.load\(", text), "unpickling outside torch.load"


# ---- 7. security ----------------------------------------------------------------------------------------

def test_local_ray_dashboard_is_off_and_bound_to_loopback(monkeypatch):
    """`init_ray` starts a local cluster with no dashboard, bound to 127.0.0.1 should it be enabled."""
    import ray

    from studies.trials import init_ray
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/ray-rel-unused")
    init_ray(None)
    assert len(calls) == 1
    kw = calls[0]
    assert kw.get("include_dashboard") is False and kw.get("dashboard_host") == "127.0.0.1"
    assert "address" not in kw and kw.get("_temp_dir") == "/tmp/ray-rel-unused"
    from trainers.common import MALLOC_ENV            # run.keep_freed_memory: the workers' startup environment
    assert kw["runtime_env"] == {"env_vars": MALLOC_ENV} and MALLOC_ENV["MALLOC_ARENA_MAX"] == "1"
    init_ray(None, keep_freed_memory=False)
    assert "runtime_env" not in calls[1]


CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "GCP service-account key": r"\"type\"\s*:\s*\"service_account\"",
    "secret-looking value": r"(?im)^\s*[\w-]*(secret|password|passwd|api[_-]?key|access[_-]?key|token)[\w-]*\s*:"
                            r"\s*['\"]?(?!\$\{?|<|~|/|None|null|''|\"\")[^\s#'\"]{8,}",
}


def test_cluster_yaml_carries_no_credentials():
    """cluster.yaml may name key *files* (ssh_private_key: ~/.ssh/...) but holds no secret values;
    a dashboard it starts binds to loopback (reached through `ray dashboard`'s SSH tunnel)."""
    text = (ROOT / "cluster.yaml").read_text()
    found = [name for name, pat in CREDENTIAL_PATTERNS.items() if re.search(pat, text)]
    assert not found, f"cluster.yaml seems to contain credentials: {found}"
    hosts = re.findall(r"--dashboard-host[= ](\S+)", text)  # a dashboard, if started, stays on loopback
    assert all(h.strip("'\"") in ("127.0.0.1", "localhost") for h in hosts), hosts


def _tokenizer_stage(cfg_dict):
    from dmvae_study.config import ExperimentConfig
    from trainers import tokenizer
    torch.set_num_threads(1)
    tokenizer.train_loop(ExperimentConfig.from_dict(cfg_dict))


@pytest.mark.slow
def test_resumed_beta_vae_tokenizer_matches_uninterrupted_on_two_workers(tmp_path):
    """The beta-VAE posterior noise and the unseeded augmentations draw from each rank's global RNG; a
    checkpoint keeps every rank's stream, so a 2-worker tokenizer run killed at step 3 and resumed from its
    step-2 checkpoint ends with the uninterrupted run's weights (before: rank 1 resumed on rank 0's stream)."""
    import torch.multiprocessing as mp

    from tests.ddp_util import run_distributed
    base = ["tokenizer.total_steps=6", "tokenizer.batch_size=8", "tokenizer.disc_start=2", "run.checkpoint_every=2",
            "run.log_every=2", "run.num_workers=2", "data.train_limit=64"]
    one = resolve(preset("smoke", [f"run.out_dir={tmp_path / 'a'}", *base]), "vae")
    run_distributed(_tokenizer_stage, 2, one.to_dict())
    faulty = resolve(preset("smoke", [f"run.out_dir={tmp_path / 'b'}", *base, "run.fail_at_step=3"]), "vae")
    with pytest.raises(mp.ProcessExitedException):
        run_distributed(_tokenizer_stage, 2, faulty.to_dict())  # rank 1 exits at step 3
    art = artifact(faulty, "tokenizer")
    assert [s for s, _ in art.checkpoints()] == [2] and not art.done
    run_distributed(_tokenizer_stage, 2, faulty.to_dict())      # the same config again: resumes at step 2
    a = load_torch(artifact(one, "tokenizer").file("tokenizer.pt"))["state"]
    b = load_torch(art.file("tokenizer.pt"))["state"]
    worst = _max_diff(a, b)
    assert worst < 1e-5, f"resumed tokenizer differs from the uninterrupted one by {worst}"
