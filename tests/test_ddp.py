"""DDP correctness: 2 workers at batch b match 1 worker at batch 2b (same data, t, eps, label drops)."""

import torch

from dmvae_study.presets import preset
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import load_torch
from dmvae_study.pipeline import artifact, resolve
from tests.ddp_util import run_distributed
from trainers import teacher


def _cfg(out, workers):
    return resolve(preset("smoke", [f"run.out_dir={out}", f"run.num_workers={workers}", "teacher.total_steps=6",
                                    "teacher.batch_size=32", "run.checkpoint_every=3", "run.log_every=3"]))


def _make_reference(cfg):
    g = torch.Generator().manual_seed(0)
    ReferenceSet.standardised(torch.randn(96, 4, 4, 4, generator=g), torch.randint(0, 10, (96,), generator=g),
                              num_classes=10).save(artifact(cfg, "reference"), 64)


def _teacher(cfg_dict):
    from dmvae_study.config import ExperimentConfig
    torch.set_num_threads(1)
    teacher.train_loop(ExperimentConfig.from_dict(cfg_dict))


def test_teacher_two_workers_equal_one_worker(tmp_path):
    one, two = _cfg(tmp_path / "one", 1), _cfg(tmp_path / "two", 2)
    for c in (one, two):
        _make_reference(c)
    _teacher(one.to_dict())
    run_distributed(_teacher, 2, two.to_dict())
    a = load_torch(artifact(one, "teacher").file("teacher.pt"))
    b = load_torch(artifact(two, "teacher").file("teacher.pt"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].dtype.is_floating_point)
    assert worst < 1e-5, f"parameters differ by {worst}"
    # and the run really trained: the EMA moved away from the initial weights
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "adaLN" in k)
