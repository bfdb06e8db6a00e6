"""The stage table and `resolve`: one path from the command line to the loss, the user's value wins,
a prior is one file, the benchmarks run the stages' own step functions."""

import importlib
import json
import sys

import pytest

from dmvae_study.presets import preset
from dmvae_study.pipeline import STAGES, artifact, artifact_key, derived, plan, resolve, shared_work

MICRO = ["tokenizer.total_steps=2", "teacher.total_steps=2", "dmd.total_steps=2", "refine.total_steps=1",
         "generator.total_steps=2", "generator.eval_every=0", "eval.sampler_steps=2", "eval.gfid_samples=8",
         "eval.rfid_images=8", "eval.grid_images=4", "data.train_limit=64", "data.val_limit=8", "prior.num_samples=32",
         "tokenizer.batch_size=8", "dmd.batch_size=8", "refine.batch_size=8", "teacher.batch_size=16",
         "generator.batch_size=16", "run.log_every=1"]


def _printed_rows(capsys) -> dict[str, dict]:
    """Row -> derived values from `--print-config` output."""
    out = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# ---- row "):
            row, _, blob = line[len("# ---- row "):].partition(": derived ")
            out[row] = json.loads(blob)
    return out


def test_user_dm_weight_reaches_every_row_and_defaults_follow_the_kind(tmp_path, capsys):
    from studies import table1
    table1.main(["--priors", "dinov2,gaussian", "--out", str(tmp_path), "--print-config"])
    rows = _printed_rows(capsys)
    assert rows["dinov2"]["dm_weight"] == 10.0 and rows["gaussian"]["dm_weight"] == 1.0  # Sec. 4 by kind
    table1.main(["--priors", "dinov2,gaussian", "--out", str(tmp_path), "--print-config", "--set", "dmd.dm_weight=20"])
    rows = _printed_rows(capsys)
    assert rows["dinov2"]["dm_weight"] == 20.0 and rows["gaussian"]["dm_weight"] == 20.0  # the user's value wins
    assert not (tmp_path / "table1-smoke").exists()  # printing configs writes nothing


def test_ablation_axis_with_a_user_setting_of_another_field(tmp_path, capsys):
    from studies import ablations
    ablations.main(["--axis", "dm_weight", "--set", "dmd.cfg_scale=3", "--out", str(tmp_path), "--print-config"])
    rows = _printed_rows(capsys)
    assert {r: d["dm_weight"] for r, d in rows.items()} == {
        "default": 10.0, "dm_weight=1.0": 1.0, "dm_weight=20.0": 20.0, "dm_weight=100.0": 100.0}
    assert all(d["cfg_scale"] == 3.0 for d in rows.values())  # the user's --set reaches every ablation row
    ablations.main(["--axis", "dm_weight", "--set", "dmd.dm_weight=20", "--out", str(tmp_path), "--print-config"])
    rows = _printed_rows(capsys)
    assert rows["default"]["dm_weight"] == 20.0 and "dm_weight=20.0" not in rows and "dm_weight=10.0" in rows


def test_stage_table_plans_keys_and_shared_work(tmp_path):
    cfg = preset("smoke", [f"run.out_dir={tmp_path}"])
    vae, dino, ldm = resolve(cfg, "vae"), resolve(cfg, "dinov2"), resolve(cfg, "ldm_noise")
    assert plan(vae) == ["tokenizer", "latents", "generator", "eval"]
    assert plan(dino) == list(STAGES)
    assert vae.tokenizer == cfg.baseline and derived(vae)["tokenizer"] == "beta_vae"
    # ldm_noise declares the beta-VAE row's tokenizer as its input (prior.ldm_source auto -> baseline_vae)
    assert ldm.prior.ldm_source == "baseline_vae"
    assert artifact_key(ldm, "reference")["inputs"]["ldm"] == artifact_key(vae, "tokenizer")
    # changing generator.* keeps every earlier artifact; changing the tokenizer changes every later one
    gen = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "generator.total_steps=7"]), "dinov2")
    assert [s for s in STAGES if artifact(gen, s).path != artifact(dino, s).path] == ["generator", "eval"]
    tok_base = preset("smoke", [f"run.out_dir={tmp_path}", "tokenizer.lr=1e-3"])  # 1e-3 typed as a user does
    tok = resolve(tok_base, "dinov2")
    assert all(artifact(tok, s).path != artifact(dino, s).path for s in STAGES)  # (the reference is its latents)
    gauss, gauss_tok = resolve(cfg, "gaussian"), resolve(tok_base, "gaussian")
    assert [s for s in STAGES if artifact(gauss_tok, s).path == artifact(gauss, s).path] == ["reference", "teacher"]
    # the DMVAE tokenizer is shared by the prior rows; the beta-VAE by vae and ldm_noise
    shared = {(s, artifact(c, s).path) for s, c in shared_work([vae, dino, ldm, resolve(cfg, "gaussian")])}
    assert ("tokenizer", artifact(dino, "tokenizer").path) in shared
    assert ("tokenizer", artifact(vae, "tokenizer").path) in shared


def test_precision_is_part_of_every_artifact_key_and_the_stage_computes_in_it(tmp_path):
    """`run.precision` changes results: a bf16 run never reuses an fp32 artifact (or the reverse), and the
    stage autocasts exactly when its key says bf16. `auto` is bf16 for GPU workers, fp32 otherwise."""
    import torch

    from dmvae_study.pipeline import amp_precision
    from trainers.common import StageContext

    def row(*over):
        return resolve(preset("smoke", [f"run.out_dir={tmp_path}", *over]), "dinov2")
    auto, fp32, bf16 = row(), row("run.precision=fp32"), row("run.precision=bf16")
    gpu_auto, gpu_fp32 = row("run.use_gpu=true"), row("run.use_gpu=true", "run.precision=fp32")
    assert [amp_precision(c) for c in (auto, fp32, bf16, gpu_auto, gpu_fp32)] == ["fp32", "fp32", "bf16", "bf16", "fp32"]
    assert [derived(c)["precision"] for c in (auto, gpu_auto, resolve(bf16, "vae"))] == ["fp32", "bf16", "bf16"]
    for s in STAGES:
        assert artifact(auto, s).path == artifact(fp32, s).path == artifact(gpu_fp32, s).path, s
        assert artifact(bf16, s).path == artifact(gpu_auto, s).path != artifact(fp32, s).path, s
    for cfg, on in ((auto, False), (bf16, True), (gpu_auto, True)):
        with StageContext(cfg=cfg, stage="teacher").autocast():  # a CPU context: the key decides, not the device
            assert torch.is_autocast_enabled("cpu") is on
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if on else torch.float32)


def test_committed_study_manifests_keep_their_keys():
    """A committed row is "done" while its manifest's evaluation artifact is the one the current code keys from
    the manifest's own config (`studies.common.done_in`): a change to the keying that moved an fp32 key would
    make every part rerun the committed study."""
    from pathlib import Path

    from dmvae_study.config import ExperimentConfig
    manifests = sorted((Path(__file__).resolve().parents[1] / "docs" / "mini-stop40" / "rows").glob("*.json"))
    assert len(manifests) >= 24
    for m in manifests:
        blob = json.loads(m.read_text())
        cfg = ExperimentConfig.from_dict(blob["config"])
        assert artifact(cfg, "eval").path.name == Path(blob["artifacts"]["eval"]).name, m.name


def test_benchmarks_time_the_stages_own_step_functions():
    from benchmarks import bench_dit, bench_dmd, bench_tokenizer
    from trainers import dmd, flowfit, tokenizer
    assert bench_dmd.STEP is dmd.step and bench_tokenizer.STEP is tokenizer.step and bench_dit.STEP is flowfit.step


@pytest.mark.slow
def test_a_prior_in_one_new_module_runs_through_the_pipeline(tmp_path, monkeypatch):
    import priors
    from trainers.launch import run_pipeline
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    importlib.import_module("tests.fixture_prior")
    try:
        cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", *MICRO]), "ring_fixture")
        assert derived(cfg)["dm_weight"] == 1.0 and derived(cfg)["stand_in"] == "a test fixture"
        res = run_pipeline(cfg)
        assert set(res) == set(STAGES) and res["eval"]["gfid_lite0"] > 0
        assert res["reference"]["distribution"] == "ring" and res["dmd"]["dm_weight"] == 1.0
    finally:
        priors.registry._REGISTRY.pop("ring_fixture", None)
        sys.modules.pop("tests.fixture_prior", None)


def test_progress_line_eta_uses_the_stage_mean_rate():
    """A gFID evaluation inside one interval slows that interval's img/s, not the ETA: 2000 of 2500
    steps left at 128 img per step and a mean of 800 img/s is 320 s, whatever the interval's 19 img/s."""
    from trainers.common import progress_line
    line = progress_line("vae-s1", "generator", 500, 2500, {"loss/fm": 0.4958, "eval/gfid_curve": 169.1}, 19.0, 128,
                         800.0)
    assert line == "[vae-s1] generator 500/2500 loss/fm 0.4958 eval/gfid_curve 169.1 | 19 img/s, ETA 5m20s"
    assert progress_line("r", "dmd", 1, 3, {}, 64.0, 64).endswith("| 64 img/s, ETA 0m02s")  # no mean: the interval's
