"""The two-worker test run (scripts/test.sh) builds a module's shared fixture once: its tests are one work unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

INNER = '''
import os, time, pytest

@pytest.fixture(scope="module")
def shared():
    with open(os.environ["SETUP_LOG"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    yield 1

def test_a(shared): time.sleep(0.2)
def test_b(shared): time.sleep(0.2)
def test_c(shared): time.sleep(0.2)
def test_free_1(): time.sleep(0.2)
def test_free_2(): time.sleep(0.2)
'''


def test_tests_sharing_a_module_fixture_run_on_one_worker(tmp_path):
    suite = tmp_path / "tests"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_shared.py").write_text(INNER)
    (suite / "test_other.py").write_text("def test_1(): pass\ndef test_2(): pass\n")
    log = tmp_path / "setups.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
           "--no-loadscope-reorder", "tests"]
    env = {**os.environ, "SETUP_LOG": str(log)}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7 passed" in out.stdout
    setups = log.read_text().split()
    assert len(setups) == 1 and setups[0].startswith("gw"), setups  # once, on a worker
