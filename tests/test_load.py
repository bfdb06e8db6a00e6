"""Load: a local Tune study of 40 tiny trials on 2 CPU cores completes without deadlock, in bounded memory.

The study goes through `studies.trials.run_tune` (the code every study script uses: local Ray start,
one Tune trial per row, restore logic, the results DataFrame) with its trial driver `row_trial`
replaced by a trivially small one, so the test measures the platform's orchestration rather than
training. Trials reserve a quarter CPU each (8 run at once on 2 cores: more contention than a real
study). Measured: the driver's peak RSS (getrusage and sampled), and the sampled peak total RSS of
the local Ray cluster (every descendant process of the driver: GCS, raylet, trial workers).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

TRIALS = 40
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of all its descendants (the local Ray cluster), every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.driver_peak, self.cluster_peak, self.procs_peak = threading.Event(), 0.0, 0.0, 0

    def run(self):
        me = os.getpid()
        while not self.stop.is_set():
            self.driver_peak = max(self.driver_peak, _rss_mib(me))
            kids = _descendants(me)
            self.cluster_peak = max(self.cluster_peak, sum(_rss_mib(p) for p in kids))
            self.procs_peak = max(self.procs_peak, len(kids))
            self.stop.wait(0.25)


def tiny_row(config: dict) -> None:
    """A trial driver with `row_trial`'s contract: resolve the row's config, report one flat record."""
    from ray import tune

    from dmvae_study.config import ExperimentConfig
    t0 = time.time()
    cfg = ExperimentConfig.from_dict(config["rows"][config["row"]])
    tune.report({"row": config["row"], "seed": cfg.run.seed, "wall_s": time.time() - t0, "status": "ok",
                 "trial_rss_mib": _rss_mib(os.getpid()), "row_done": 1,
                 "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", "unset")})


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_forty_trial_study_completes_in_bounded_memory(tmp_path, monkeypatch, record_property):
    import ray

    import argparse

    import studies.common as common
    import studies.trials as trials
    from dmvae_study.presets import preset
    from dmvae_study.pipeline import resolve
    from studies import resources
    ray_tmp = tempfile.mkdtemp(prefix="ray-load-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    monkeypatch.setattr(trials, "row_trial", tiny_row)
    cfg = preset("smoke", [f"run.out_dir={tmp_path}", "run.name=load", "run.cpus_per_worker=0.25",
                           "run.threads=1", "run.max_failures=0"])  # threads set: the 0.25 CPU per trial is kept
    rows = {f"seed{i:02d}": resolve(cfg.replace(run=cfg.run.replace(seed=i)), "gaussian") for i in range(TRIALS)}
    args = argparse.Namespace(restart=False, mlflow=None, wandb=None, address=None)
    study = common.Study("load", tmp_path / "load", cfg, rows, args)
    sampler = MemorySampler()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sampler.start()
    t0 = time.time()
    try:
        trials.init_ray(None)
        df = trials.run_tune(study)
        wall = time.time() - t0
        node = ray._private.worker.global_worker.node
        webui = node.address_info.get("webui_url")
        concurrency = resources.max_concurrency(cfg, TRIALS, multinode=False)
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    peak_driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"trials": TRIALS, "concurrency": concurrency, "wall_s": round(wall, 1),
               "driver_maxrss_before_mib": round(rss0), "driver_maxrss_mib": round(peak_driver),
               "driver_sampled_peak_mib": round(sampler.driver_peak), "cluster_peak_mib": round(sampler.cluster_peak),
               "cluster_procs_peak": sampler.procs_peak,
               "trial_rss_max_mib": round(float(df["trial_rss_mib"].max())) if len(df) else None}
    for k, v in figures.items():
        record_property(k, v)
    print("\nload figures:", figures)

    assert len(df) == TRIALS and sorted(df["seed"]) == list(range(TRIALS)), "trials lost or duplicated"
    assert concurrency >= 2  # 8 on 2 cores at a quarter CPU per trial
    assert set(df["malloc_arena_max"]) == {"1"}  # run.keep_freed_memory reaches the trial processes (MALLOC_ENV)
    assert not webui, f"local Ray exposes a dashboard at {webui}"  # security: dashboard off (bound to loopback)
    # Bounded memory: the driver grows by little over 40 trials; the cluster stays far below the box's 24 GiB.
    assert sampler.driver_peak - rss0 < 1024 or peak_driver < 2048, figures
    assert sampler.cluster_peak < 8 * 1024, figures
