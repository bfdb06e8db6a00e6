"""Every study script end to end in its smoke mode (CI runs these; they take minutes).

Table 1 over every row and the ablations run on the smoke preset shrunk with `--set` (`tests.micro`):
what they test is that every prior and every axis goes through the whole study (Ray, store, manifests,
tables), not the smoke numbers. The smoke preset's own step counts run end to end in
`test_regression.py` (every stage, exact numbers against a golden file)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.micro import MICRO, set_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(args, tmp_path, timeout=1500):
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's tmp_path.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"), "DMVAE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_toy2d_smoke_and_reuse(tmp_path):
    run(["studies/toy2d.py", "--preset", "smoke", "--out", str(tmp_path)], tmp_path)
    out = tmp_path / "toy2d-smoke"
    df = pd.read_csv(out / "toy2d.csv", index_col=0)
    assert {"dm", "real_score_1", "fake_score_1", "reference"} <= set(df.index)
    assert {"energy", "swd", "coverage", "nn_dist", "pair_dist", "steps_to_threshold"} <= set(df.columns)
    assert df.loc["dm", "coverage"] > 0 and (out / "fig3.png").stat().st_size > 10_000
    assert (out / "gradient_field.png").stat().st_size > 10_000
    again = run(["studies/toy2d.py", "--preset", "smoke", "--out", str(tmp_path), "--set", "steps=20",
                 "--set", "objectives=[dm]"], tmp_path)
    assert "reusing the real score model" in again.stdout


def test_table1_smoke_every_row(tmp_path):
    run(["studies/table1.py", "--preset", "smoke", "--out", str(tmp_path), *set_args(MICRO)], tmp_path)
    root = tmp_path / "table1-smoke"
    df = pd.read_csv(root / "table1.csv")
    from priors import ROWS
    assert list(df["row"]) == list(ROWS)
    for col in ("rfid", "psnr", "gfid", "is", "wall_s"):
        assert df[col].notna().all(), col
    assert df.set_index("row").loc["dinov2", "random_init"]  # no staged DINOv2 weights: flagged
    assert not df.set_index("row").loc["supervised_lite0", "random_init"]  # real offline weights
    md = (root / "table1.md").read_text()
    assert "gFID-8" in md and "random-init" in md and "lite0" in md
    for ext in ("parquet", "tex"):
        assert (root / f"table1.{ext}").stat().st_size > 0
    assert len(list((root / "rows").glob("*.json"))) == len(ROWS)


def test_ablations_two_axes(tmp_path):
    run(["studies/ablations.py", "--preset", "smoke", "--out", str(tmp_path), "--axis", "dm_weight",
         "--axis", "timestep_schedule", *set_args(MICRO)], tmp_path)
    df = pd.read_csv(tmp_path / "ablations-smoke" / "ablations.csv")
    assert list(df["row"]) == ["default", "dm_weight=1.0", "dm_weight=20.0", "dm_weight=100.0",
                               "timestep_schedule=anneal"]  # Table 2: 1, 20, 100 around the default 10
    assert df["gfid"].notna().all()
