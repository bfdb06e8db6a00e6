"""Bad input through the platform's entry points: one table, one test per row.

Each row feeds one kind of bad input to a pipeline stage (`run_pipeline`, in-process) or to the
Table 1 CLI, and expects either a clear error of a named type whose message names the problem and
the fix, raised from the platform's own code (never from deep inside torch), or a documented,
counted skip. The dataset-level behaviour of odd images is tests/test_data.py; here the images go
through the tokenizer stage. Stages run at smoke size with 1 step (random-init tiny nets on purpose).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae_study.config import ExperimentConfig
from dmvae_study.presets import preset
from dmvae_study.configlib import ConfigError
from dmvae_study.data import DatasetNotFoundError
from dmvae_study.reference import ReferenceSet
from dmvae_study.weights import MissingWeightsError
from priors.siglip_text import MissingCaptionsError
from dmvae_study.pipeline import artifact, resolve
from trainers.launch import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tokenizer.total_steps=1", "tokenizer.batch_size=4", "run.checkpoint_every=1", "run.log_every=1"]


# ---- inputs ----------------------------------------------------------------------------------------

def _folder(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    """`root/train/<class>/` with a few good 12x12 RGB PNGs per class."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def _folder_cfg(tmp: Path, root: Path, *extra: str) -> ExperimentConfig:
    return preset("smoke", [f"run.out_dir={tmp / 'out'}", "data.dataset=folder", f"data.root={root}",
                            "data.resolution=16", "data.num_classes=2", *TINY, *extra])


def _tokenizer_on(add: Callable[[Path], None], *extra: str) -> Callable[[Path], dict]:
    """Tokenizer stage on a small good folder plus what `add(train_dir)` puts there."""
    def run(tmp: Path) -> dict:
        root = _folder(tmp / "data")
        add(root / "train")
        return run_pipeline(_folder_cfg(tmp, root, *extra), stages=["tokenizer"])["tokenizer"]
    return run


def _corrupt(train: Path) -> None:
    (train / "a" / "garbage.png").write_bytes(b"not a png at all" * 20)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(train / "b" / "cut.jpg")
    full = (train / "b" / "cut.jpg").read_bytes()
    (train / "b" / "cut.jpg").write_bytes(full[: len(full) // 3])


def _grey(train: Path) -> None:
    for i in range(2):
        Image.fromarray(np.full((10, 14), 60 * i, np.uint8), "L").save(train / "a" / f"grey{i}.png")


def _cmyk(train: Path) -> None:
    Image.new("CMYK", (20, 18), (0, 255, 0, 0)).save(train / "a" / "cmyk.jpg", quality=95)


def _grey16(train: Path) -> None:
    Image.fromarray(np.full((20, 24), 32896, np.uint16)).save(train / "b" / "grey16.png")


def _tiny(train: Path) -> None:
    Image.fromarray(np.full((2, 3, 3), 200, np.uint8)).save(train / "b" / "tiny.png")


def _empty_class(train: Path) -> None:
    (train / "c_empty").mkdir()


def _missing_root(tmp: Path) -> Any:
    cfg = _folder_cfg(tmp, tmp / "no-such-dataset")
    return run_pipeline(cfg, stages=["tokenizer"])


def _class_count_mismatch(tmp: Path) -> Any:
    return run_pipeline(_folder_cfg(tmp, _folder(tmp / "data"), "data.num_classes=10"), stages=["tokenizer"])


def _fmnist_cfg(tmp: Path, *extra: str) -> ExperimentConfig:
    return preset("smoke", [f"run.out_dir={tmp / 'out'}", "data.train_limit=32", "data.val_limit=8", *TINY, *extra])


def _resolution_30(tmp: Path) -> Any:
    return run_pipeline(_fmnist_cfg(tmp, "data.resolution=30"), stages=["tokenizer"])


def _head_none(tmp: Path) -> Any:
    """Latents (4, 4, 4) against a token-shaped reference (4, 1, 8) with `dmd.head=none`."""
    cfg = resolve(_fmnist_cfg(tmp, "dmd.head=none", "teacher.total_steps=1", "teacher.batch_size=8",
                              "dmd.batch_size=4", "prior.reduction=pca"))
    g = torch.Generator().manual_seed(0)
    art = artifact(cfg, "reference")
    ReferenceSet.standardised(torch.randn(16, 8, 4, generator=g)).save(art, 64)  # (N, L, D)
    art.mark_done({"count": 16})
    return run_pipeline(cfg, stages=["tokenizer", "teacher", "dmd"])


def _weights_missing(tmp: Path) -> Any:
    cfg = _fmnist_cfg(tmp, "tokenizer.backbone=dinov2_vits14", "run.allow_random_weights=false",
                      f"run.weights_dir={tmp / 'empty-weights'}")
    return run_pipeline(cfg, stages=["tokenizer"])


def _unknown_prior_in_config(tmp: Path) -> Any:
    return run_pipeline(_fmnist_cfg(tmp, "prior.name=nope"), stages=["reference"])


def _captions_missing(tmp: Path) -> Any:
    captions = tmp / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "caption": f"a photo {i}"}) + "\n" for i in range(10)))
    cfg = _fmnist_cfg(tmp, "prior.name=siglip_text", f"prior.captions={captions}", "prior.num_samples=null")
    return run_pipeline(cfg, stages=["reference"])


def _config_file_unknown_key(tmp: Path) -> Any:
    d = preset("smoke").to_dict()
    d["run"]["seeds"] = 3  # a typo in a saved / hand-written config
    return ExperimentConfig.from_dict(d)


def _table1(*argv: str) -> Callable[[Path], Any]:
    """The Table 1 CLI in-process; Ray or a stage starting would fail the row (checked before any work)."""
    def run(tmp: Path) -> Any:
        import studies.trials as trials
        import trainers.launch as launch
        from studies import table1

        def never(*a, **k):
            raise AssertionError("Ray or a stage started on bad input")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trials, "init_ray", never)
            mp.setattr(launch, "run_pipeline", never)
            return table1.main([*argv, "--out", str(tmp / "out")])
    return run


def _table1_process(*argv: str) -> Callable[[Path], Any]:
    """The Table 1 CLI as a user runs it: a process; a failure becomes SystemExit(rc) with its stderr."""
    def run(tmp: Path) -> Any:
        proc = subprocess.run([sys.executable, "studies/table1.py", *argv, "--out", str(tmp / "out")], cwd=ROOT,
                              env={**os.environ, "RAY_TMPDIR": str(tmp / "ray")}, capture_output=True, text=True,
                              timeout=180)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp / "ray").exists(), "Ray started on bad input"
        if proc.returncode:
            raise SystemExit(f"rc={proc.returncode}\n{proc.stderr}")
        return proc.stdout
    return run


def _malformed_config_file(tmp: Path) -> Any:
    bad = tmp / "bad.yaml"
    bad.write_text("dmd:\n  dm_weight: 20\n  cfg_scale: [1, 3\nrun:\n  seed: 1\n")  # unclosed list on line 3
    return _table1_process("--config", str(bad))(tmp)


def _config_file_wrong_value(tmp: Path) -> Any:
    f = tmp / "study.yaml"
    f.write_text("dmd:\n  dm_weight: -3\n")
    return _table1_process("--config", str(f))(tmp)


def _captions_malformed(tmp: Path) -> Any:
    captions = tmp / "captions.jsonl"
    captions.write_text(json.dumps({"id": 0, "caption": "fine"}) + "\n" + "{not json\n")
    cfg = _fmnist_cfg(tmp, "prior.name=siglip_text", f"prior.captions={captions}", "prior.num_samples=null")
    return run_pipeline(cfg, stages=["reference"])


def _folder_without_images(tmp: Path) -> Any:
    (tmp / "data" / "train" / "a").mkdir(parents=True)
    (tmp / "data" / "train" / "a" / "notes.txt").write_text("no images here")
    return run_pipeline(_folder_cfg(tmp, tmp / "data", "data.num_classes=1"), stages=["tokenizer"])


def _corrupt_weights(tmp: Path) -> Any:
    """A staged EfficientNet-Lite0 file that is not the released one: its sha256 fails."""
    w = tmp / "weights"
    w.mkdir()
    (w / "efficientnet-lite0-57934424.pth").write_bytes(b"truncated download" * 100)
    return _table1_process("--priors", "vae", "--set", f"run.weights_dir={w}")(tmp)


def _incompatible_results(tmp: Path) -> Any:
    old = tmp / "out" / "table1-smoke"
    (old / "rows").mkdir(parents=True)
    (old / "rows" / "vae.json").write_text("{}")  # a study folder of the platform before STUDY_FORMAT
    return _table1_process("--priors", "vae")(tmp)


def _conflicting_sets(tmp: Path) -> Any:
    return _table1_process("--set", "dmd.dm_weight=20", "--set", "dmd.dm_weight=30")(tmp)


def _repeated_row(tmp: Path) -> Any:
    proc = subprocess.run([sys.executable, "studies/table1.py", "--priors", "vae,vae", "--out", str(tmp / "out"),
                           "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr + f"\nrows printed: {proc.stdout.count('# ---- row ')}"


def _repeated_ablation_value(tmp: Path) -> Any:
    proc = subprocess.run([sys.executable, "studies/ablations.py", "--sweep", "dmd.vae_every=2,2,3", "--out",
                           str(tmp / "out"), "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr + f"\nrows printed: {proc.stdout.count('# ---- row ')}"


# ---- the table --------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    run: Callable[[Path], Any]                  # drives an entry point with the bad input
    error: type[BaseException] | None           # expected exception; None: a documented counted skip
    says: tuple[str, ...]                       # the message (or warnings) name the problem and the fix
    check: Callable[[Any], bool] | None = None  # skips: what the result must show


ROWS = [
    Row("corrupt_and_truncated_images", _tokenizer_on(_corrupt), None,
        ("skipping unreadable image", "garbage.png", "cut.jpg"), lambda s: s["skipped_images"] == 2),
    Row("grayscale_images", _tokenizer_on(_grey), None, (), lambda s: s["skipped_images"] == 0),
    Row("cmyk_jpeg", _tokenizer_on(_cmyk), None, (), lambda s: s["skipped_images"] == 0),
    Row("16bit_png", _tokenizer_on(_grey16), None, (), lambda s: s["skipped_images"] == 0),
    Row("tiny_2x3_image", _tokenizer_on(_tiny), None, (), lambda s: s["skipped_images"] == 0),
    Row("empty_class_folder", _tokenizer_on(_empty_class, "data.num_classes=3"), DatasetNotFoundError,
        ("have no images", "c_empty", "data.num_classes=2")),
    Row("folder_without_images", _folder_without_images, DatasetNotFoundError, ("no images", "train")),
    Row("dataset_path_missing", _missing_root, DatasetNotFoundError, ("no-such-dataset", "data.root=")),
    Row("class_count_mismatch", _class_count_mismatch, ValueError, ("has 2 classes", "num_classes=10")),
    Row("resolution_not_divisible_by_stride", _resolution_30, ConfigError,
        ("data.resolution=30", "multiple of tokenizer.encoder_stride=8", "e.g. data.resolution=24")),
    Row("head_none_with_shape_mismatch", _head_none, ValueError, ("(4, 4, 4)", "(4, 1, 8)", "dmd.head")),
    Row("batch_not_divisible_by_workers", _table1("--priors", "vae", "--set", "run.num_workers=3"), SystemExit,
        ("batch_size=32: must be a multiple of run.num_workers=3", "e.g.", "batch_size=30")),
    Row("unknown_prior_cli", _table1_process("--priors", "nope"), SystemExit,
        ("rc=2", "unknown row(s) nope", "choose from", "gaussian", "dinov2")),
    Row("unknown_prior_in_config", _unknown_prior_in_config, ConfigError,
        ("prior.name=nope", "unknown prior 'nope'", "registered priors", "gaussian", "e.g. prior.name=dinov2")),
    Row("captions_missing_entries", _captions_missing, MissingCaptionsError,
        ("no caption for 22 of the 32", "first ids: 10, 11", "data.train_limit")),
    Row("unknown_config_key_cli", _table1("--set", "tokenizer.nope=1"), SystemExit,
        ("unknown config key tokenizer.nope", "valid keys here", "latent_channels")),
    Row("unknown_section_cli", _table1("--set", "tokeniser.total_steps=1"), SystemExit,
        ("unknown config key tokeniser", "tokenizer")),
    Row("wrong_type_cli", _table1("--set", "teacher.total_steps=abc"), SystemExit,
        ("teacher.total_steps=abc", "expected int", "e.g. teacher.total_steps=")),
    Row("invalid_value_cli", _table1("--set", "dmd.cfg_scale=0.5"), SystemExit, ("cfg_scale", "must be >= 1")),
    Row("negative_dmd_batch_cli", _table1_process("--set", "dmd.batch_size=-4"), SystemExit,
        ("rc=2", "dmd.batch_size=-4: must be > 0, e.g. dmd.batch_size=")),
    Row("negative_dm_weight_cli", _table1_process("--set", "dmd.dm_weight=-5"), SystemExit,
        ("rc=2", "dmd.dm_weight=-5.0: must be >= 0")),
    Row("zero_gfid_samples_cli", _table1_process("--set", "eval.gfid_samples=0"), SystemExit,
        ("rc=2", "eval.gfid_samples=0: must be > 0")),
    Row("resolution_cli_no_traceback", _table1_process("--set", "data.resolution=30"), SystemExit,
        ("rc=2", "data.resolution=30: must be a multiple of tokenizer.encoder_stride=8")),
    Row("unknown_choice_lists_choices", _table1_process("--set", "data.dataset=cifar"), SystemExit,
        ("rc=2", "data.dataset=cifar: expected one of fmnist, folder, synthetic")),
    Row("eval_count_beyond_dataset", _table1_process("--set", "eval.gfid_ref_images=100000"), SystemExit,
        ("rc=2", "eval.gfid_ref_images=100000: must be <= the 512 training images")),
    Row("dm_time_range_inverted", _table1_process("--set", "dmd.t_min=0.8", "--set", "dmd.t_max=0.5"), SystemExit,
        ("rc=2", "dmd.t_max=0.5: must be > t_min=0.8")),
    Row("malformed_config_yaml", _malformed_config_file, SystemExit, ("rc=2", "bad.yaml:4:4: invalid YAML", "flow sequence at line 3, column 14")),
    Row("config_file_invalid_value", _config_file_wrong_value, SystemExit, ("rc=2", "dmd.dm_weight=-3.0: must be >= 0")),
    Row("captions_malformed_line", _captions_malformed, ValueError, ("captions.jsonl:2", "expected a JSON object")),
    Row("weights_checksum_fails", _corrupt_weights, SystemExit,
        ("rc=2", "fail their checksum", "efficientnet-lite0-57934424.pth", "fetch efficientnet_lite0")),
    Row("results_of_an_older_version", _incompatible_results, SystemExit,
        ("rc=2", "older platform version", "--clean")),
    Row("set_twice_conflicting", _conflicting_sets, SystemExit, ("rc=2", "dmd.dm_weight is set twice, to 20 and 30")),
    Row("row_named_twice", _repeated_row, None, ("--priors lists vae twice; running it once", "rows printed: 1"),
        lambda out: "rows printed: 1" in out),
    Row("ablation_value_twice", _repeated_ablation_value, None, ("lists 2 twice; running it once", "rows printed: 3"),
        lambda out: "rows printed: 3" in out),
    Row("unknown_key_in_config_file", _config_file_unknown_key, ConfigError, ("unknown config key run.seeds",
                                                                             "valid keys", "seed")),
    Row("weights_file_missing", _weights_missing, MissingWeightsError,
        ("vit_small_patch14_dinov2.lvd142m.safetensors", "empty-weights", "python -m dmvae_study.weights fetch "
         "dinov2_vits14", "run.weights_dir")),
]


def _raised_in_platform(excinfo: pytest.ExceptionInfo) -> None:
    """The innermost frame is the platform's own check, not a library (torch, PIL) failing later."""
    where = Path(str(excinfo.traceback[-1].path)).resolve()
    assert ROOT in where.parents and ".venv" not in where.parts, f"raised deep inside a library: {where}"


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    if row.error is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = row.run(tmp_path)
        said = "\n".join(str(w.message) for w in caught) + (result if isinstance(result, str) else "")
        assert all(s in said for s in row.says), said
        assert row.check(result), result
        return
    with pytest.raises(row.error) as excinfo:
        row.run(tmp_path)
    message = str(excinfo.value) + "\n" + capsys.readouterr().err
    if row.error is SystemExit:
        code = excinfo.value.code
        assert code not in (0, None), "a failed CLI must exit non-zero"
        message += str(code)
    else:
        _raised_in_platform(excinfo)
    missing = [s for s in row.says if s not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Wall seconds to start Python and import the study's modules (`studies.table1` and what it imports),
    measured on this machine in this run: the floor a rejected setting cannot go below."""
    import time
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import studies.table1"], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    return time.perf_counter() - t0


@pytest.mark.parametrize("setting", ["dmd.batch_size=-4", "eval.gfid_samples=0", "data.dataset=cifar",
                                     "dmd.dm_weight=nan", "run.seed=-1"])
def test_a_single_invalid_set_exits_within_seconds_without_ray(setting, tmp_path, startup_s):
    """A researcher's typo costs seconds: exit code 2, one line, no traceback, no Ray process (its temp dir is
    never created), and no work beyond start-up: the wall time is within 2x + 2 s of importing the study's
    modules alone, measured in the same run (a ratio, so a loaded machine slows both; an absolute limit
    failed beside two training runs)."""
    import time
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "studies/table1.py", "--set", setting, "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and setting.split("=")[0] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out").exists()
    assert elapsed < 2 * startup_s + 2, f"{elapsed:.1f} s against {startup_s:.1f} s to import the study"


def test_a_row_without_result_is_failed_with_its_stage_or_unfinished(tmp_path):
    """A trial that raised is `failed` with the stage and error its driver wrote; one that ended without
    an error and without a result (the study was interrupted) is `unfinished`, with the command that
    resumes it, never `stage nan: None`."""
    from studies.trials import failure_record
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "gmm-s1.failed.json").write_text(json.dumps(
        {"stage": "dmd", "error": "ValueError: bad", "log": "/x/logs/gmm-s1.log"}))
    failed = failure_record(tmp_path, "gmm-s1", "gmm", RuntimeError("trial raised"))
    assert (failed["status"], failed["failed_stage"], failed["error"], failed["log"]) == \
        ("failed", "dmd", "ValueError: bad", "/x/logs/gmm-s1.log")
    unfinished = failure_record(tmp_path, "vae-s2", "vae", None)
    assert unfinished["status"] == "unfinished" and unfinished["failed_stage"] is None
    assert "same command resumes" in unfinished["error"]
    assert unfinished["log"] == str(tmp_path / "logs" / "vae-s2.log")
    stale = failure_record(tmp_path, "gmm-s1", "gmm", None)  # an old failure file does not make it failed
    assert stale["status"] == "unfinished"
