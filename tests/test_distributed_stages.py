"""No rank-0 bottlenecks: the latent cache and the evaluation run on every rank and give the tensors /
metrics of one rank; the cache is resumable shard by shard and memory-mapped on read.

Tolerance: exact equality. Neither stage reduces floats across ranks: every rank encodes / samples /
extracts whole batches that do not depend on the number of ranks (fixed batch partition, noise seeded per
batch), with the same intra-op thread count (one, `run.threads` unset on CPU), and the main rank reduces the
gathered per-batch results in batch order, as one rank does. Only the gFID-vs-step curve of the generator
is compared with a tolerance: it samples the EMA net that DDP trains, whose weights differ between 1 and 2
workers by the float order of the gradient all-reduce (1e-5, tests/test_ddp.py)."""

import json
import shutil

import numpy as np
import pytest
import torch

from dmvae_study.build import build_dit, for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.presets import preset
from dmvae_study.data import build_dataset, dataset_targets
from dmvae_study.pipeline import artifact, resolve
from tests.ddp_util import run_distributed
from trainers import evaluate, generator, latents
from trainers.launch import run_pipeline

SHARD_IMAGES = 100  # 512 training images in shards of 100 -> 128 (whole batches of 32): 4 shards


def _cfg(out, **extra):
    """A baseline row (no prior stages) of the smoke preset, shrunk to seconds."""
    sets = [f"run.out_dir={out}", "baseline.total_steps=4", "generator.total_steps=4", "generator.eval_every=0",
            "generator.batch_size=32", "eval.batch_size=32", "eval.gfid_samples=80", "eval.rfid_images=72",
            "eval.sampler_steps=3", "eval.gfid_ref_images=100", "run.log_every=2", "run.checkpoint_every=100"]
    return resolve(preset("smoke", sets + [f"{k}={v}" for k, v in extra.items()]), "vae")


def _stage(name, cfg_dict, shard_images=SHARD_IMAGES):
    """One stage in this process (or a spawned worker) with the test's shard size."""
    torch.set_num_threads(1)
    latents.LATENT_SHARD = shard_images
    stage = {"latents": latents, "generator": generator, "eval": evaluate}[name]
    stage.train_loop(ExperimentConfig.from_dict(cfg_dict))


def _copy(row, out, stages, **run):
    """`row` under another results folder (and `run` settings) with the artifacts of `stages` copied there."""
    cfg = row.replace(run=row.run.replace(out_dir=str(out), **run))
    for st in stages:
        shutil.copytree(artifact(row, st).path, artifact(cfg, st).path)
    return cfg


def _cache(cfg):
    z, y = latents.load_latents(cfg)
    return z[torch.arange(len(z))], y


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    """Tokenizer and a 1-worker latent cache of the smoke baseline row (shared by the tests)."""
    cfg = _cfg(tmp_path_factory.mktemp("row"))
    run_pipeline(cfg, stages=["tokenizer"])
    _stage("latents", cfg.to_dict())
    return cfg


def test_cache_layout_and_memory_map(row):
    art = artifact(row, "latents")
    index = json.loads(art.file("index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [256, 256, 256, 256]  # 128 images and their flips each
    assert index["count"] == 1024 and all(s["dtype"] == "float16" for s in index["shards"])
    z, y = latents.load_latents(row)
    # No float32 copy: the shards stay memory-mapped, a batch is read (float16) only when indexed.
    assert all(isinstance(m, np.memmap) and m.dtype == np.float16 for m in z.maps)
    assert not any(torch.is_tensor(v) and v.numel() > 16 for v in vars(z).values())
    assert z.shape == (1024, *index["shape"]) and z.dtype == torch.float16 and y.dtype == torch.int64
    # Row order: per batch of 32 images, the images, then their flips (the one-process order).
    ds = build_dataset(row.data, "train", hflip=False)
    targets = torch.as_tensor(dataset_targets(ds))
    assert torch.equal(y, torch.cat([targets[s:s + 32].repeat(2) for s in range(0, 512, 32)]))
    idx = torch.tensor([5, 1023, 0, 300, 300, 700])
    full = torch.cat([torch.from_numpy(np.array(m)) for m in z.maps])
    assert torch.equal(z[idx], full[idx]) and torch.equal(z[3:9], full[3:9]) and torch.equal(z[-1], full[-1])
    # The flipped rows are the encodings of the flipped images (first batch, its flips follow at 32..63).
    tok = for_inference(load_tokenizer(artifact(row, "tokenizer")))
    img = torch.stack([ds[i][0] for i in range(32)])
    with torch.no_grad():
        want = tok.normalize(tok.encode(img.flip(-1))).float().half()
    assert torch.equal(z[torch.arange(32, 64)], want)


def test_cache_resumes_shard_by_shard(row, tmp_path):
    """A lost shard and a corrupt one are recomputed (equal to before); the intact ones are not rewritten."""
    cfg = _copy(row, tmp_path, ("tokenizer", "latents"))
    art = artifact(cfg, "latents")
    want = _cache(row)
    for name in ("DONE", "index.json", "labels.pt", "labels.pt.sha256"):  # killed before the index
        art.file(name).unlink()
    art.file("z-00001.npy").unlink()
    raw = bytearray(art.file("z-00002.npy").read_bytes())
    raw[-1] ^= 0xFF
    art.file("z-00002.npy").write_bytes(bytes(raw))
    before = {i: art.file(f"z-{i:05d}.npy").stat().st_ino for i in (0, 3)}
    _stage("latents", cfg.to_dict())
    assert {i: art.file(f"z-{i:05d}.npy").stat().st_ino for i in (0, 3)} == before  # kept, not rewritten
    got = _cache(cfg)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.slow
def test_latents_two_workers_equal_one_worker(row, tmp_path):
    """Each of 2 ranks encodes 2 of the 4 shards; the cache equals the 1-worker cache bit for bit."""
    cfg = _copy(row, tmp_path, ("tokenizer",), num_workers=2)
    run_distributed(_stage, 2, "latents", cfg.to_dict())
    one, two = _cache(row), _cache(cfg)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    one_s, two_s = artifact(row, "latents").summary(), artifact(cfg, "latents").summary()
    assert two_s.pop("host").endswith("· 2 workers") and "workers" not in one_s.pop("host")  # where each ran
    assert one_s == two_s


@pytest.mark.slow
def test_evaluation_two_workers_equal_one_worker(row, tmp_path):
    """Reconstruction (3 batches: 32, 32, 8 images), samples (3 batches) and the gFID reference (100
    images in 2 shards) split over 2 ranks give the 1-worker metrics and grids exactly."""
    cfg = _copy(row, tmp_path, ("tokenizer", "latents"))
    _stage("generator", cfg.to_dict())
    _stage("eval", cfg.to_dict(), shard_images=64)
    one = artifact(cfg, "eval").summary()
    grids = {f: artifact(cfg, "eval").file(f).read_bytes() for f in ("samples.png", "reconstructions.png")}
    artifact(cfg, "eval").clear()
    ref = next((tmp_path / "smoke" / "store" / "fid_ref").iterdir())
    ref_one = torch.from_numpy(np.load(ref / "features-00000.npy"))
    shutil.rmtree(ref)  # the reference features are extracted again, by both ranks
    two_cfg = cfg.replace(run=cfg.run.replace(num_workers=2))
    run_distributed(_stage, 2, "eval", two_cfg.to_dict(), 64)
    two = artifact(cfg, "eval").summary()
    assert json.loads((ref / "index.json").read_text())["count"] == 100 and (ref / "features-00001.npy").exists()
    assert torch.equal(torch.from_numpy(np.load(ref / "features-00000.npy")), ref_one)
    assert one.pop("world") == 1 and two.pop("world") == 2
    for k in ("wall_s", "host"):
        one.pop(k, None), two.pop(k, None)
    assert one == two, {k: (one[k], two.get(k)) for k in one if one[k] != two.get(k)}
    assert one["gfid_samples"] == 80 and one["gfid_ref_images"] == 100 and 0 < one["psnr"] < 60
    assert {f: artifact(cfg, "eval").file(f).read_bytes() for f in grids} == grids


def test_generate_seeds_each_batch(row):
    """`generate`'s batch b is a function of b alone (its own seeded generator), not of the batches drawn
    before it: batch 1 sampled alone, as rank 1 of 2 does, equals rows 32..63 of the one-process run."""
    from dmvae_study.samplers import Sampler
    from trainers.common import StageContext
    cfg, ev = row, row.eval
    shape = tuple(artifact(cfg, "latents").summary()["shape"])
    torch.manual_seed(0)
    net = build_dit(cfg.generator, shape, cfg.data.num_classes).eval()
    tok = load_tokenizer(artifact(cfg, "tokenizer"))
    ext = evaluate.Features(ev.extractor, cfg, torch.device("cpu"))
    full = evaluate.generate(cfg, StageContext(cfg=cfg, stage="eval"), net, tok, ext, 70, shape)
    assert full["features"].shape == (70, 1280) and torch.equal(full["labels"], evaluate.balanced_labels(70, 10))
    assert [[b for b, _ in evaluate._batches(70, 32, r, 2)] for r in (0, 1)] == [[0, 2], [1]]
    g = torch.Generator().manual_seed(evaluate.hash_seed(cfg.run.seed, "samples", 4242, 1))
    y = evaluate.balanced_labels(70, 10)[32:64]
    with torch.no_grad():
        z = Sampler(kind=ev.sampler, steps=ev.sampler_steps, cfg_scale=ev.cfg_scale)(
            net, torch.randn((32, *shape), generator=g), y, generator=g).float()
    assert torch.equal(z.flatten(1), full["latents"][32:64])


@pytest.mark.slow
def test_gfid_curve_on_two_workers(row, tmp_path):
    """The generator's gFID curve is sampled by both ranks (and its reference extracted by both) at the
    same steps; it matches the 1-worker curve up to the DDP weight differences (see the module doc)."""
    curves = []
    for workers in (1, 2):
        cfg = _copy(row.replace(generator=row.generator.replace(eval_every=2, curve_samples=48)),
                    tmp_path / str(workers), ("tokenizer", "latents"), num_workers=workers)
        if workers == 1:
            _stage("generator", cfg.to_dict())
        else:
            run_distributed(_stage, 2, "generator", cfg.to_dict())
        lines = [json.loads(x) for x in artifact(cfg, "generator").file("metrics.jsonl").read_text().splitlines()]
        curves.append([(m["step"], m["eval/gfid_curve"]) for m in lines if "eval/gfid_curve" in m])
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == [2, 4]
    for (_, a), (_, b) in zip(*curves):
        assert b == pytest.approx(a, rel=1e-4)  # measured: 2e-6
