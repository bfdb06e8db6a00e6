"""cluster.yaml passes Ray's own cluster-config validation (what `ray up` runs first), offline."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def validate(path: str | Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load(Path(path).read_text())
    prepared = prepare_config(cfg)  # fills defaults exactly as `ray up` does, then its schema check
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid():
    cfg = validate(ROOT / "cluster.yaml")
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] >= 1 and cfg["max_workers"] >= workers["max_workers"]
    assert "p5.48xlarge" in workers["node_config"]["InstanceType"]  # 8-GPU nodes
    assert any("pip install -e" in c for c in cfg["setup_commands"])  # installs this project


def test_cluster_yaml_keeps_secrets_and_dashboard_private():
    text = (ROOT / "cluster.yaml").read_text()
    for secret in ("aws_secret_access_key", "AKIA", "password", "token:"):
        assert secret.lower() not in text.lower()
    head = yaml.safe_load(text)["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in c for c in head)
