"""The stages end to end: the smoke pipeline on 2 Ray Train workers, kill-and-resume, reuse of a
finished stage, and DDP equivalence of the DMD stage."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dmvae_study.build import load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.presets import preset
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import load_torch
from tests.ddp_util import run_distributed
from tests.micro import micro
from dmvae_study.pipeline import artifact, resolve
from trainers import dmd, teacher
from trainers.launch import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _reference(cfg, n=96):
    """A ready reference set in the row's reference artifact (the stage then counts as finished)."""
    g = torch.Generator().manual_seed(0)
    art = artifact(cfg, "reference")
    ReferenceSet.standardised(torch.randn(n, 4, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g),
                              num_classes=10).save(art, 64)
    art.mark_done({"count": n})


def test_killed_stage_resumes_and_finished_stage_is_reused(tmp_path):
    cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "teacher.total_steps=12", "run.checkpoint_every=4",
                                   "run.fail_at_step=6", "run.log_every=2"]))
    _reference(cfg)
    # A separate process dies at step 6 (after the step-4 checkpoint), as a preempted worker would.
    code = ("import sys; from dmvae_study.config import ExperimentConfig; from trainers import teacher; "
            "import json; teacher.train_loop(ExperimentConfig.from_dict(json.loads(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], cwd=ROOT,
                          env={**os.environ, "DMVAE_NO_PROGRESS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr[-2000:]
    art = artifact(cfg, "teacher")
    assert [s for s, _ in art.checkpoints()] == [4] and not art.done
    out = teacher.train_loop(cfg)  # same config: resumes from step 4, finishes
    assert art.done and out["steps"] == 12
    steps = [json.loads(line)["step"] for line in art.file("metrics.jsonl").read_text().splitlines()]
    # logged 2, 4, 6 before the kill at step 6; resumed from the step-4 checkpoint, so 6 is logged again
    assert steps == [2, 4, 6, 6, 8, 10, 12]
    before = art.file("metrics.jsonl").read_text()
    again = teacher.train_loop(cfg)  # finished: no work, same summary
    assert again == art.summary() and art.file("metrics.jsonl").read_text() == before


def _prepare_dmd(cfg):
    """Tokenizer, reference and teacher for the DMD stage, built once in-process."""
    run_pipeline(cfg, stages=["tokenizer"])
    _reference(cfg, n=128)
    teacher.train_loop(cfg)


def _dmd(cfg_dict):
    torch.set_num_threads(1)
    dmd.train_loop(ExperimentConfig.from_dict(cfg_dict))


@pytest.mark.slow
def test_dmd_two_workers_equal_one_worker(tmp_path):
    common = ["prior.name=dinov2", "dmd.gan_start=null", "prior.reduction=pca", "dmd.total_steps=6", "dmd.batch_size=16", "dmd.vae_every=2",
              "tokenizer.total_steps=4", "teacher.total_steps=4", "run.checkpoint_every=100", "run.log_every=3",
              "prior.reduced_dim=4"]
    one = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "run.num_workers=1", *common]))
    two = one.replace(run=one.run.replace(num_workers=2))
    _prepare_dmd(one)
    _dmd(one.to_dict())
    tok_a = load_tokenizer(artifact(one, "dmd"))
    fa = load_torch(artifact(one, "dmd").file("fake.pt"))
    artifact(one, "dmd").clear()  # same artifact key (workers are not part of it): rerun with 2 workers
    run_distributed(_dmd, 2, two.to_dict())
    tok_b = load_tokenizer(artifact(two, "dmd"))
    fb = load_torch(artifact(two, "dmd").file("fake.pt"))
    worst = max(float((fa[k].float() - fb[k].float()).abs().max()) for k in fa if fa[k].dtype.is_floating_point)
    assert worst < 1e-4, f"fake score net parameters differ by {worst}"
    # The VAE is compared as a function. Its last decoder level's conv biases feed only per-channel
    # GroupNorms (one channel per group at ch=16), so their exact gradient is 0; Adam's first steps
    # move every parameter by about +-lr whatever the gradient's size, so those biases follow the sign
    # of float round-off (1e-3 apart here) and change neither latents nor reconstructions.
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        za, zb = tok_a.encode(x), tok_b.encode(x)
        ra, rb = tok_a.decode(za), tok_b.decode(za)
    torch.testing.assert_close(zb, za, rtol=1e-4, atol=1e-6, msg="latents differ")  # latents are ~1e-2 in size
    torch.testing.assert_close(rb, ra, rtol=0, atol=1e-4, msg="reconstructions differ")


@pytest.mark.slow
def test_smoke_pipeline_two_ray_workers(tmp_path, monkeypatch):
    """All stages for one prior on a 2-worker Ray Train group (one start-up for the whole row), at the
    micro size (`tests.micro`): the stages' two-worker numerics are compared with one worker elsewhere."""
    import ray
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", *micro("prior.name=dinov2", "run.num_workers=2")]))
        res = run_pipeline(cfg)
    finally:
        ray.shutdown()
    assert set(res) == {"tokenizer", "reference", "teacher", "dmd", "refine", "latents", "generator", "eval"}
    ev = res["eval"]
    assert ev["random_init"] is True  # dinov2 without staged weights: labelled
    assert 0 < ev["psnr"] < 60 and ev["gfid_lite0"] > 0 and ev["rfid_lite0"] >= 0
    assert res["reference"]["world"] == 2  # feature extraction was sharded over the workers
    assert artifact(cfg, "eval").file("samples.png").stat().st_size > 0


def test_a_finished_tokenizer_records_its_weights_fingerprint_and_host(tmp_path):
    """Two trainings under one artifact key can differ (a store lost and retrained on another machine: CPU training
    is not bit-reproducible across hosts), so the summary records which weights and where: the fingerprint of the
    saved state, and the host that ran the stage (every stage)."""
    from dmvae_study.build import state_fingerprint
    cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "tokenizer.total_steps=2", "tokenizer.batch_size=8",
                                   "data.train_limit=32", "run.log_every=1"]), "vae")
    run_pipeline(cfg, stages=["tokenizer"])
    art = artifact(cfg, "tokenizer")
    summary = art.summary()
    assert summary["fingerprint"] == state_fingerprint(load_torch(art.file("tokenizer.pt"))["state"])
    assert f"torch {torch.__version__}" in summary["host"] and "thread" in summary["host"]


def test_a_stage_resumed_at_its_final_checkpoint_keeps_its_summary(tmp_path):
    """A stage that failed while finishing (after its final checkpoint) resumes there and runs no step; its summary
    still carries the last logged metrics (before, `loss/fm` here and DMD's `match/swd` came back None: two rows of
    the stop-41 mini rerun lost their matching distance that way)."""
    cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "teacher.total_steps=4", "run.checkpoint_every=2",
                                   "run.log_every=2"]))
    _reference(cfg)
    first = teacher.train_loop(cfg)
    art = artifact(cfg, "teacher")
    (art.path / "DONE").unlink()  # as if the stage died after saving its step-4 checkpoint
    again = teacher.train_loop(cfg)
    assert first["loss/fm"] is not None and again["loss/fm"] == first["loss/fm"]
