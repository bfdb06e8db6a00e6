"""cluster.yaml, offline: Ray's own launcher validation (what `ray up` runs first), the image and AMI it
pins, where trial drivers and work can land, and setup commands that fail loudly. cluster-local.yaml
(the same shape with fake nodes, run for real in tests/test_autoscaling.py) is checked alongside."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dmvae_study.presets import preset
from studies import resources

ROOT = Path(__file__).resolve().parents[1]
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
SETUP_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")


def validate(path: str | Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load(Path(path).read_text())
    prepared = prepare_config(cfg)  # fills defaults exactly as `ray up` does, then its schema check
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return validate(ROOT / "cluster.yaml")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


# ---- what `ray up` checks, and the shape --------------------------------------------------------------

def test_cluster_yaml_is_valid(cluster):
    workers = cluster["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and 1 <= workers["max_workers"] <= cluster["max_workers"]
    assert workers["node_config"]["InstanceType"] == "p5.48xlarge" and workers["resources"]["GPU"] == 8


def test_cluster_local_yaml_has_the_same_shape_on_the_fake_provider(cluster):
    """Ray's schema check (prepare_config needs the fake provider's example.yaml, which the wheel
    does not ship; the file is complete without defaults), and the same node types as cluster.yaml."""
    from ray.autoscaler._private.util import validate_config
    local = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    validate_config(local)
    assert local["provider"] == {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                                 "disable_launch_config_check": True}
    assert set(local["available_node_types"]) == set(cluster["available_node_types"])
    assert local["head_node_type"] == cluster["head_node_type"] == "ray.head.default"
    for name, node in local["available_node_types"].items():  # GPUs are CPU stand-ins here
        assert set(node["resources"]) <= set(cluster["available_node_types"][name]["resources"])
    assert local["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0, "head": 1}
    assert local["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert local["available_node_types"]["gpu_worker"]["max_workers"] >= 2  # room for rows side by side
    assert all(local[k] == [] for k in (*SETUP_KEYS, "head_start_ray_commands", "worker_start_ray_commands"))


# ---- image, AMI, EFA ---------------------------------------------------------------------------------

def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M))


def test_image_is_pinned_to_the_tested_ray_and_torch(cluster):
    """One image for every node, its tag naming the Ray and torch this repository is tested with;
    the Dockerfile that builds it pins the same, on Ray's GPU image, with the job server and boto3."""
    ray_v, torch_v = version("ray"), version("torch").split("+")[0]
    image = cluster["docker"]["image"]
    assert f"ray{ray_v}" in image and f"torch{torch_v}" in image and "py311" in image, image
    assert "head_image" not in cluster["docker"] and "worker_image" not in cluster["docker"]
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == ray_v and args["TORCH_VERSION"] == torch_v
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert '"ray[default,train,tune]==${RAY_VERSION}"' in text and " boto3" in text
    assert "PYTHONPATH=/home/ray/dmvae-study" in text  # where file_mounts puts the checkout
    assert "~/dmvae-study" in cluster["file_mounts"] and not any(p.startswith("/shared") for p in cluster["file_mounts"])


def test_gpu_ami_efa_and_limits(cluster):
    types = cluster["available_node_types"]
    assert {t["node_config"]["ImageId"] for t in types.values()} == {DLAMI}  # NVIDIA driver, docker, EFA; any region
    nics = types["gpu_worker"]["node_config"]["NetworkInterfaces"]
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(32))  # every p5 network card
    assert all(n["InterfaceType"] == "efa" and n["SubnetId"] and n["Groups"] for n in nics)
    assert [n["DeviceIndex"] for n in nics if n["NetworkCardIndex"] == 0] == [0]
    docker = cluster["docker"]
    assert "--ulimit nofile=65536:65536" in docker["run_options"] and "--volume /shared:/shared" in docker["run_options"]
    assert "--device=/dev/infiniband" in docker["worker_run_options"] and "--gpus all" in docker["worker_run_options"]


# ---- where drivers and work run (studies/resources.py against both configs) ---------------------------

def _fits(bundle: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items())


@pytest.mark.parametrize("path, presets", [("cluster.yaml", ("smoke", "imagenet256")), ("cluster-local.yaml", ("smoke",))])
def test_trial_drivers_fit_only_the_head_and_work_only_the_workers(path, presets):
    types = yaml.safe_load((ROOT / path).read_text())["available_node_types"]
    head, worker = types["ray.head.default"]["resources"], types["gpu_worker"]["resources"]
    for name in presets:
        cfg = preset(name)
        (driver,) = resources.trial_resources(cfg, multinode=True, offers_head=True).bundles
        assert _fits(driver, head) and not _fits(driver, worker), (name, driver)
        assert not resources.in_process(cfg, multinode=True)  # the work is a Train group, off the head
        assert _fits(resources.worker_bundle(cfg), worker) and not _fits(resources.worker_bundle(cfg), head)


def test_trial_resources_on_one_machine():
    """Single node: a 1-worker row runs inside its trial, which holds the worker's CPU (so Tune starts
    no more rows than fit) and a share of `head`; a several-worker row's trial holds the driver only."""
    smoke = preset("smoke")
    (b,) = resources.trial_resources(smoke, multinode=False, offers_head=True).bundles
    assert b == {"CPU": smoke.run.cpus_per_worker, "head": resources.DRIVER_SHARE}
    two = smoke.replace(run=smoke.run.replace(num_workers=2))
    assert resources.trial_resources(two, multinode=False, offers_head=True).bundles == [{"head": resources.DRIVER_SHARE}]
    gpu = preset("imagenet256")
    assert resources.trial_resources(gpu, multinode=False, offers_head=False).bundles == [{"CPU": resources.DRIVER_SHARE}]


def test_max_concurrency():
    smoke = preset("smoke")
    assert resources.max_concurrency(smoke, 10, multinode=True) == 10  # the autoscaler sees every row
    assert resources.max_concurrency(smoke, 10, multinode=False, cluster={"CPU": 2.0}) == 2  # 0.9 CPU per row
    capped = smoke.replace(run=smoke.run.replace(max_concurrent_trials=3))
    assert resources.max_concurrency(capped, 10, multinode=True) == 3
    gpu = preset("imagenet256")  # 8 GPUs per row
    assert resources.max_concurrency(gpu, 10, multinode=False, cluster={"GPU": 8.0, "CPU": 192.0}) == 1
    assert resources.max_concurrency(gpu, 10, multinode=False, cluster={"CPU": 2.0}) == 1


# ---- setup commands fail loudly ------------------------------------------------------------------------

def _setup_commands(raw: dict) -> list[tuple[str, str]]:
    return [(k, c) for k in SETUP_KEYS for c in raw.get(k) or []]


def test_setup_commands_are_strict_scripts(raw):
    """Every command that mounts, checks or writes is one `set -euo pipefail` script with no escape
    hatch: no `|| true` (the old NFS mount's), no `&&` chains (errexit ignores a failure before the
    last `&&`), and every `||` handler exits non-zero. Nothing is installed at scale-up (that is
    the image's job)."""
    cmds = _setup_commands(raw)
    assert {k for k, _ in cmds} == set(SETUP_KEYS)
    for key, cmd in cmds:
        assert cmd.startswith("set -euo pipefail;"), (key, cmd)
        assert "&&" not in cmd, (key, cmd)
        for bad in (r"\|\|\s*(true|:|echo|exit 0)\b", r";\s*true\b", r"\bpip3? install\b", r"\bapt(-get)? install\b"):
            assert not re.search(bad, cmd), (key, bad, cmd)
        for handler in re.finditer(r"\|\|", cmd):
            block = cmd[handler.end():].lstrip()
            assert block.startswith("{") and re.match(r"\{[^}]*exit 1;\s*\}", block), (key, block[:80])
    mount = raw["initialization_commands"][0]
    assert "mount -t nfs4" in mount and "SHARED_FS=" in mount


STUB_BINARIES = ("sudo", "mkdir", "mountpoint", "mount", "stat", "install", "hostname", "date", "touch", "rm",
                 "python", "fi_info")


def _run(cmd: str, tmp_path: Path, fail: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one setup command under bash with every external program replaced by a stub that logs its
    call and succeeds (`stat -f` says nfs), except the ones in `fail`: name -> stub body."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    ok = {"sudo": 'exec "$@"', "stat": "echo nfs", "hostname": "echo node-1", "date": "echo 2026-01-01T00:00:00Z",
          "mountpoint": "exit 1"}  # not mounted yet: the script must mount
    for name in STUB_BINARIES:
        body = (fail or {}).get(name, ok.get(name, "exit 0"))
        (stubs / name).write_text(f'#!/bin/bash\necho "{name} $*" >> "{tmp_path}/calls"\n{body}\n')
        (stubs / name).chmod(0o755)
    (tmp_path / "calls").write_text("")
    bash = subprocess.run(["bash", "-c", "command -v bash"], capture_output=True, text=True).stdout.strip()
    return subprocess.run([bash, "-c", cmd.replace("/shared/", f"{tmp_path}/shared/")], env={"PATH": str(stubs)},
                          capture_output=True, text=True, timeout=30)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


def test_shared_storage_mount_fails_loudly(raw, tmp_path):
    """The mount script, run with stub programs: left unedited it stops at once; a failed mount,
    or a /shared that is not NFS afterwards, stops it before anything is written; with a working
    mount it creates the writable folders."""
    mount = raw["initialization_commands"][0]
    unedited = _run(mount, tmp_path)
    assert unedited.returncode != 0 and "SHARED_FS" in unedited.stderr and not _calls(tmp_path)

    edited = re.sub(r"SHARED_FS=\S+;", "SHARED_FS=fs-0abc.efs.us-east-1.amazonaws.com:/;", mount)
    assert edited != mount
    failed = _run(edited, tmp_path, fail={"mount": "echo 'mount.nfs4: Connection timed out' >&2; exit 32"})
    assert failed.returncode == 32 and not any(c.startswith("install") for c in _calls(tmp_path))

    local = _run(edited, tmp_path, fail={"mountpoint": "exit 0", "stat": "echo ext2/ext3"})  # a local /shared
    assert local.returncode != 0 and "not an NFS mount" in local.stderr
    assert not any(c.startswith("install") for c in _calls(tmp_path))

    good = _run(edited, tmp_path)
    assert good.returncode == 0, good.stderr
    calls = _calls(tmp_path)
    assert any(c.startswith("mount -t nfs4") for c in calls) and calls[-1].startswith("install -d -o 1000")


@pytest.mark.parametrize("key, fail, message", [
    ("setup_commands", {"stat": "echo ext2/ext3"}, "not the NFS mount"),
    ("setup_commands", {"touch": "exit 1"}, ""),                       # /shared/results not writable
    ("setup_commands", {"python": "exit 1"}, ""),                      # the image lacks ray / torch / the checkout
    ("head_setup_commands", {"python": "exit 1"}, ""),                 # no boto3 / job server on the head
    ("worker_setup_commands", {"python": "exit 1"}, ""),               # not 8 GPUs visible
    ("worker_setup_commands", {"fi_info": "exit 1"}, ""),              # no EFA in the container
])
def test_container_setup_fails_loudly(raw, tmp_path, key, fail, message):
    (tmp_path / "shared" / "results").mkdir(parents=True)
    (tmp_path / "shared" / "results" / ".dmvae-study-head").write_text("head")
    (cmd,) = raw[key]
    assert _run(cmd, tmp_path).returncode == 0  # the stubs' happy path passes
    failed = _run(cmd, tmp_path, fail=fail)
    assert failed.returncode != 0 and message in failed.stderr


def test_worker_setup_fails_without_the_heads_shared_filesystem(raw, tmp_path):
    """A worker whose /shared lacks the head's marker (a different or empty filesystem) stops."""
    (tmp_path / "shared" / "results").mkdir(parents=True)
    failed = _run(raw["worker_setup_commands"][0], tmp_path)
    assert failed.returncode != 0 and "not the head's filesystem" in failed.stderr


# ---- secrets and the dashboard -------------------------------------------------------------------------

def test_cluster_yaml_keeps_secrets_and_dashboard_private(raw):
    text = (ROOT / "cluster.yaml").read_text()
    for secret in ("aws_secret_access_key", "AKIA", "password"):
        assert secret.lower() not in text.lower()
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # a token file, copied; no value here
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    assert not any("--dashboard-host" in c and "127.0.0.1" not in c for c in raw["head_start_ray_commands"])
