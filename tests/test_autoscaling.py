"""Ray's own autoscaler on this machine (fake nodes, no mock) runs a Table 1 study like cluster.yaml.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster-local.yaml` starts the real Ray
autoscaler (monitor.py, StandardAutoscaler) with the `fake_multinode` provider: every worker node it
adds is a separate raylet on this machine. The study goes in through the job server, as on the GPU
cluster, and a watcher process samples the cluster through Ray's state API:

    ray job submit --address http://127.0.0.1:8265 -- \\
        python studies/table1.py --preset smoke --priors vae,gaussian --out <shared dir>

1. uninterrupted: the autoscaler adds worker nodes (more than one) for the rows' Train groups, the
   rows run at the same time on different nodes, trial drivers stay on the head and Train workers
   off it, the job finishes, and every worker node is removed after `idle_timeout_minutes`;
2. node loss: the same study (fresh results folder) loses a whole worker node (its raylet, its agents
   and all their descendants, SIGKILL) while a DMVAE row's Train worker there is mid-way through the
   teacher stage, past a checkpoint; Ray Train restarts that row's group on a node, the stage resumes
   from its checkpoint, and the table equals run 1's (model columns).

Wall times and node counts are printed (`pytest -s`): about 4-5 minutes on 2 shared CPU cores, so
it is `slow` (CI runs it); alone: `pytest tests/test_autoscaling.py -s`. Needs `ray[default]` (the
job server; skipped without it). The cluster runs on free ports with its own temp dir and auth token, and is stopped by the
pids of its session: other Ray clusters on the machine are left alone.
Fake nodes share this machine's filesystem, so any folder is "shared storage"; `--working-dir` is
not used here because the fake nodes would also share (and garbage-collect) its unpacked copy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.micro import micro, set_args

ROOT = Path(__file__).resolve().parents[1]
ROWS = "vae,gaussian"  # two rows: the fewest that can run on two nodes at once (CI time)
# A smoke study shrunk so that each row takes a minute or two while two rows and the autoscaler
# share 2 CPU cores. The DMVAE rows' teacher stage is the one the test interrupts: long enough (60
# steps, a checkpoint every 5) that the kill lands mid-stage, after a checkpoint.
CHECKPOINT_EVERY = 5
KILL_STAGE = "teacher"
STUDY = micro("tokenizer.total_steps=8", "baseline.total_steps=8", "teacher.total_steps=60", "dmd.total_steps=6",
              "refine.total_steps=4", "generator.total_steps=8", f"run.checkpoint_every={CHECKPOINT_EVERY}",
              f"run.log_every={CHECKPOINT_EVERY}")
MODEL_COLUMNS = ("row", "prior", "rfid", "psnr", "gfid", "is", "extractor", "gfid_samples", "matching_swd",
                 "diversity", "latent_diversity", "random_init")
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(2400)]


# ---- the fake cluster -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pids_matching(*needles: str, session: int | None = None) -> list[int]:
    """Live processes whose command line contains one of `needles`, or in session `session`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            continue
        if sid == session or any(n.encode() in cmd for n in needles):
            out.append(int(d.name))
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class FakeCluster:
    """cluster-local.yaml brought up by `ray start --head` on free ports, in its own temp dir, with its
    own auth token (Ray's token auth is on; every client below reads this token)."""

    def __init__(self, tmp: Path):
        self.tmp, self.session = tmp, 0
        from ray._private.services import get_node_ip_address
        self.ports = {k: _free_port() for k in ("gcs", "dash", "client", "agent")}
        self.gcs = f"{get_node_ip_address()}:{self.ports['gcs']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['dash']}"
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        # `python` is this venv's; every Ray worker imports this checkout.
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_TMPDIR": str(tmp / "r"),
                    "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)

    def start(self) -> "FakeCluster":
        cfg = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
        cfg["provider"]["gcs_address"] = self.gcs  # fake nodes join this head, not the default port
        config = self.tmp / "cluster-local.yaml"
        config.write_text(yaml.safe_dump(cfg))
        p = self.ports
        cmd = [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={config}", "--num-cpus=0",
               '--resources={"head": 1}', f"--port={p['gcs']}", f"--dashboard-port={p['dash']}",
               "--dashboard-host=127.0.0.1", f"--ray-client-server-port={p['client']}",
               f"--dashboard-agent-listen-port={p['agent']}", f"--temp-dir={self.tmp / 'r'}", "--disable-usage-stats"]
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.session = proc.pid
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        return self

    def stop(self) -> None:
        """End this cluster's processes by pid (never `ray stop`: other clusters share the machine)."""
        marker = str(self.tmp / "r")
        _kill(_pids_matching(marker, session=self.session), signal.SIGTERM)
        deadline = time.time() + 15
        while _pids_matching(marker, session=self.session) and time.time() < deadline:
            time.sleep(0.5)
        _kill(_pids_matching(marker, session=self.session), signal.SIGKILL)

    def kill_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of one fake node (what losing the machine does): its raylet, the
        agents naming its node id, and every descendant of those (the node's Ray workers)."""
        roots = set(_pids_matching(f"--node_id={node_id}", f"--node-id={node_id}"))
        parent = {}
        for d in Path("/proc").iterdir():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
        family = set(roots)
        while True:
            more = {pid for pid, pp in parent.items() if pp in family} - family
            if not more:
                break
            family |= more
        _kill(sorted(family), signal.SIGKILL)
        return sorted(family)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


# ---- the watcher (its own process: Ray's client auth state stays out of pytest) ---------------------

def watch_main(dashboard: str, out: str, period: float = 2.0) -> None:
    """Append one JSON line per `period` s to `out`: alive worker / head nodes, where trial drivers
    (Tune's function trainables) and Ray Train workers run, dead Train workers, job statuses."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes
    t0 = time.time()
    while True:
        try:
            nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                               raise_on_missing_output=False)
            actors = list_actors(address=dashboard, limit=10000, raise_on_missing_output=False)
            jobs = {j.submission_id: str(j.status.value) for j in JobSubmissionClient(dashboard).list_jobs()
                    if j.submission_id}
        except Exception as e:  # a busy dashboard on 2 cores: skip the sample
            print(f"watch: {e}", file=sys.stderr)
        else:
            live = [a for a in actors if a.state == "ALIVE"]
            sample = {"t": round(time.time() - t0, 1), "head": [n.node_id for n in nodes if n.is_head_node],
                      "workers": [n.node_id for n in nodes if not n.is_head_node],
                      "drivers": [a.node_id for a in live if a.class_name == "ImplicitFunc"],
                      "train": [[a.node_id, a.actor_id, a.pid] for a in live if a.class_name == "RayTrainWorker"],
                      "train_dead": [a.actor_id for a in actors if a.class_name == "RayTrainWorker" and a.state == "DEAD"],
                      "jobs": jobs}
            with open(out, "a") as f:
                f.write(json.dumps(sample) + "\n")
        time.sleep(period)


class Watch:
    def __init__(self, cluster: FakeCluster, path: Path):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-c", f"from tests.test_autoscaling import watch_main; "
                                      f"watch_main({cluster.dashboard!r}, {str(path)!r})"],
                                     cwd=ROOT, env=cluster.env, stderr=subprocess.DEVNULL)

    def samples(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.endswith("}")]

    def latest(self) -> dict | None:
        s = self.samples()
        return s[-1] if s else None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def summary(samples: list[dict]) -> dict:
    return {"max_worker_nodes": max((len(s["workers"]) for s in samples), default=0),
            "max_nodes_with_train_workers": max((len({n for n, *_ in s["train"]}) for s in samples), default=0),
            "max_concurrent_trial_drivers": max((len(s["drivers"]) for s in samples), default=0),
            "first_worker_node_s": next((s["t"] for s in samples if s["workers"]), None),
            "worker_nodes_seen": len({n for s in samples for n in s["workers"]}),
            "drivers_off_head": sorted({d for s in samples for d in s["drivers"] if d not in s["head"]}),
            "train_on_head": sorted({n for s in samples for n, *_ in s["train"] if n in s["head"]})}


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("aiohttp", reason="ray job submit needs the job server: pip install 'ray[default]'")
    tmp = Path(tempfile.mkdtemp(prefix="fk-", dir="/tmp"))  # short: Ray's unix socket paths
    c = FakeCluster(tmp)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the study as a job -----------------------------------------------------------------------------

def submit(cluster: FakeCluster, out: Path, tag: str) -> str:
    """`ray job submit` of the Table 1 smoke study; returns at once, the job runs on the head."""
    job = f"table1-{tag}-{secrets.token_hex(3)}"
    # RAY_ADDRESS: other Ray clusters may run on this machine; Ray Train's helpers that look the
    # cluster up (its placement-group cleaner) must find this one.
    env_vars = {"DMVAE_NO_PROGRESS": "1", "RAY_ADDRESS": cluster.gcs, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", job, "--no-wait",
                       "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
                       "python", "studies/table1.py", "--preset", "smoke", "--priors", ROWS, "--out", str(out),
                       *set_args(STUDY))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return job


def wait_job(cluster: FakeCluster, watch: Watch, job: str, timeout_s: float, during=None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        last = watch.latest()
        status = (last or {}).get("jobs", {}).get(job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            logs = cluster.ray("job", "logs", "--address", cluster.dashboard, job).stdout
            assert status == "SUCCEEDED", f"job {job} {status}:\n{logs[-6000:]}"
            return
        if during is not None:
            during(last)
        time.sleep(1)
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, job).stdout
    raise AssertionError(f"job {job} still running after {timeout_s} s:\n{logs[-6000:]}")


def wait_scaled_down(watch: Watch, timeout_s: float = 300) -> float:
    """Seconds from now until a fresh sample shows no worker node."""
    t0, n0 = time.time(), len(watch.samples())
    while time.time() - t0 < timeout_s:
        fresh = watch.samples()[n0:]
        if fresh and not fresh[-1]["workers"]:
            return time.time() - t0
        time.sleep(1)
    raise AssertionError(f"worker nodes still up {timeout_s} s after the job: {watch.latest()}")


def table(out: Path) -> pd.DataFrame:
    """The study's table, model columns only (Tune's bookkeeping and timings differ between runs)."""
    df = pd.read_csv(out / "table1-smoke" / "table1.csv")
    return df[[c for c in MODEL_COLUMNS if c in df]]


def stage_in_progress(store: Path, kind: str, holders: set[int]) -> tuple[Path, int] | None:
    """A `kind` artifact a live Train worker is building, past its first checkpoint: its folder has
    no DONE and at least two metric records (`log_every` = `checkpoint_every`, so a checkpoint
    exists), and its lock (`.<artifact>.lock`, flock) is held by a pid in `holders`.
    Returns (artifact folder, holder pid)."""
    inodes = {}
    for lock in store.glob(f"{kind}/.*.lock"):
        try:
            inodes[lock.stat().st_ino] = lock.parent / lock.name[1:-len(".lock")]
        except OSError:
            pass
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or not f[4].isdigit() or int(f[4]) not in holders:
            continue
        art = inodes.get(int(f[5].rsplit(":", 1)[-1]))
        if art is not None and not (art / "DONE").exists() and (art / "metrics.jsonl").exists():
            if len((art / "metrics.jsonl").read_text().splitlines()) >= 2:
                return art, int(f[4])
    return None


# ---- the test -----------------------------------------------------------------------------------------

def test_study_scales_up_runs_rows_concurrently_survives_node_loss_and_scales_down(cluster, tmp_path):
    report = {}
    # 1. uninterrupted
    watch = Watch(cluster, tmp_path / "watch1.jsonl")
    try:
        t0 = time.time()
        job = submit(cluster, tmp_path / "run1", "uninterrupted")
        wait_job(cluster, watch, job, timeout_s=1200)
        report["run1_wall_s"] = round(time.time() - t0, 1)
        report["run1_scale_down_s"] = round(wait_scaled_down(watch), 1)
    finally:
        watch.stop()
    report["run1"] = s1 = summary(watch.samples())
    print("\n[autoscaling]", json.dumps(report))
    assert s1["max_worker_nodes"] >= 2, f"the autoscaler never ran more than one worker node: {s1}"
    assert s1["max_nodes_with_train_workers"] >= 2, f"rows never ran at the same time on different nodes: {s1}"
    assert not s1["drivers_off_head"], f"trial drivers ran on worker nodes {s1['drivers_off_head']}"
    assert not s1["train_on_head"], "Ray Train workers ran on the head"
    first = table(tmp_path / "run1")
    assert list(first["row"]) == ROWS.split(",") and first["gfid"].notna().all()

    # 2. a worker node dies mid-row
    watch = Watch(cluster, tmp_path / "watch2.jsonl")
    killed = {}
    store = tmp_path / "run2" / "table1-smoke" / "store"

    def kill_once(last):
        """Kill the node whose Train worker is mid-way through a row's teacher stage (past a
        checkpoint), while the rows run (trial drivers alive)."""
        if killed or not last or not last["train"] or not last["drivers"]:
            return
        pid_node = {pid: (node, actor) for node, actor, pid in last["train"]}
        found = stage_in_progress(store, KILL_STAGE, set(pid_node))
        if found:
            art, pid = found
            node, actor = pid_node[pid]
            killed.update(node=node, actor=actor, stage=f"{art.parent.name}/{art.name}", t_s=round(time.time() - t0, 1),
                          records=len((art / "metrics.jsonl").read_text().splitlines()), pids=cluster.kill_node(node))

    try:
        t0 = time.time()
        job = submit(cluster, tmp_path / "run2", "node-loss")
        wait_job(cluster, watch, job, timeout_s=1500, during=kill_once)
        report["run2_wall_s"] = round(time.time() - t0, 1)
        report["run2_scale_down_s"] = round(wait_scaled_down(watch), 1)
    finally:
        watch.stop()
    samples = watch.samples()
    report["run2"] = s2 = summary(samples)
    report["killed"] = {k: v for k, v in killed.items() if k != "pids"} | {"processes": len(killed.get("pids", []))}
    art = store / killed["stage"] if killed else None
    resumed = [json.loads(x).get("resumed_from", 0) for x in (art / "metrics.jsonl").read_text().splitlines()] if art else []
    report["killed"]["resumed_from"] = max(resumed, default=0)
    print("\n[autoscaling]", json.dumps(report))
    assert killed.get("pids"), "no worker node was killed (no Train worker was seen mid-stage)"
    assert killed["actor"] in samples[-1]["train_dead"], "the killed node's Train worker did not die"
    assert all(killed["node"] not in s["workers"] for s in samples[-3:]), "the killed node came back"
    assert (art / "DONE").exists() and max(resumed) >= CHECKPOINT_EVERY, \
        f"the interrupted stage did not resume from its checkpoint: {resumed}"
    assert not s2["drivers_off_head"] and not s2["train_on_head"], s2
    pd.testing.assert_frame_equal(table(tmp_path / "run2"), first, check_exact=False, rtol=1e-6, atol=1e-9)
