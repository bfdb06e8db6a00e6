"""Test-session plumbing for running the suite on two pytest-xdist workers (`scripts/test.sh`).

Most end-to-end tests keep one of the two cores busy on average (Ray start-up, process spawns, waits on
shared artifacts), so two workers finish the suite in well under the serial time. Three things make that
safe and balanced:

- every worker gets its own Ray temp dir (`RAY_TMPDIR`), so two local Ray clusters never share a session
  folder (each already picks free ports);
- tests that share a module- or session-scoped fixture defined in their own module (the operations
  study, the uninterrupted teacher run, ...) are one work unit, so the fixture is built once. (xdist's
  own `xdist_group` marker does not group under pytest 9, whose node ids it can no longer suffix; the
  workers write the groups to a file named by the controller, and `Grouped` below reads it.)
- the collection is ordered longest first (`SECONDS`: measured wall times of the slowest tests on the
  2-core machine, a scheduling hint only; anything not listed counts as short), so the two workers end
  together instead of one starting a 5-minute test at the end. Run with `--dist loadgroup
  --no-loadscope-reorder` (scripts/test.sh) for this order to be used.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

_GROUPS_ENV = "DMVAE_XDIST_GROUPS"

# Wall seconds of the slow tests (pytest --durations, 2 CPU cores; keys: module or module::test).
SECONDS = {
    "test_autoscaling.py": 360, "test_operations.py": 400, "test_studies.py::test_table1_smoke_every_row": 325,
    "test_reliability.py": 300, "test_studies.py::test_ablations_two_axes": 160,
    "test_studies.py::test_toy2d_smoke_and_reuse": 160, "test_load.py": 115, "test_pipeline.py": 100,
    "test_distributed_stages.py": 90, "test_regression.py": 65, "test_benchmarks.py": 60,
    "test_dmd_matching.py": 50,
}


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        base = os.environ.get("RAY_TMPDIR", "/tmp/ray-dmvae")
        os.environ["RAY_TMPDIR"] = f"{base}-{worker}"
    elif getattr(config.option, "numprocesses", None):  # the xdist controller: workers inherit the env
        fd, path = tempfile.mkstemp(prefix="dmvae-xdist-groups-", suffix=".json")
        os.close(fd)
        os.environ[_GROUPS_ENV] = path
        config.add_cleanup(lambda: os.path.exists(path) and os.unlink(path))


def _own_shared_fixture(item) -> bool:
    """Whether the item uses a module/class/session-scoped fixture defined in a test module (not pytest's)."""
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        fd = defs[-1]
        if fd.scope != "function" and fd.baseid and "tests" in fd.baseid:
            return True
    return False


def _seconds(item) -> float:
    module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    name = item.nodeid.split("::")[1].split("[")[0] if "::" in item.nodeid else ""
    return SECONDS.get(f"{module}::{name}", SECONDS.get(module, 0.0))


def pytest_collection_modifyitems(config, items):
    groups = {it.nodeid: it.nodeid.split("::")[0] for it in items if _own_shared_fixture(it)}
    path = os.environ.get(_GROUPS_ENV)
    if path and os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects the same; write atomically
        tmp = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
        with open(tmp, "w") as f:
            json.dump(groups, f)
        os.replace(tmp, path)
    # Longest first; a module listed as a whole keeps its tests together and in order.
    order = {id(it): i for i, it in enumerate(items)}
    items.sort(key=lambda it: (-_seconds(it), order[id(it)]))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # xdist not installed: serial runs only
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class Grouped(LoadScopeScheduling):
        """One work unit per test, except the tests the workers grouped by their shared module fixture."""

        _groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # read once, at the first schedule() (after every worker collected)
                path = os.environ.get(_GROUPS_ENV)
                text = open(path).read() if path and os.path.exists(path) else ""
                self._groups = json.loads(text) if text else {}
            return self._groups.get(nodeid, nodeid)

    @pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's DSession, which picks its loadgroup
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadgroup":
            return Grouped(config, log)
        return None
