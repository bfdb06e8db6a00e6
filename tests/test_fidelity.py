"""The paper's method where Table 1 and Table 2 are decided (App. A, Sec. 5.1; official code where the
paper is silent): the DINO reference is the tokenizer's own latents, annealing goes toward low noise,
baselines are conv autoencoders, the official DMD optimiser, uniform teacher times, balanced evaluation."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae_study.build import build_tokenizer, load_tokenizer
from dmvae_study.presets import preset
from dmvae_study.data import balanced_subset, build_dataset
from dmvae_study.metrics import sliced_wasserstein
from dmvae_study.objectives.flow import annealed_t_range, sample_t
from dmvae_study.pipeline import LaunchOptions, artifact, resolve
from dmvae_study.reference import ReferenceSet

MICRO = ["tokenizer.total_steps=2", "tokenizer.batch_size=8", "data.train_limit=64", "prior.num_samples=48",
         "prior.batch_size=16", "prior.shard_size=32", "run.log_every=1", "prior.reduced_dim=4"]


def test_annealing_contracts_toward_data():
    """Sec. 5.1: ProlificDreamer's noise range [0, 1] -> [0, 0.5] is [0, 1] -> [0.5, 1] here (t = 1 data)."""
    assert annealed_t_range(0.0) == (0.0, 1.0) and annealed_t_range(1.0) == (0.5, 1.0)
    assert annealed_t_range(0.5) == (0.25, 1.0)
    g = torch.Generator().manual_seed(0)
    lo, hi = annealed_t_range(0.0)
    t0 = sample_t(20000, t_min=lo, t_max=hi, generator=g)
    assert float(t0.min()) < 0.01 and float(t0.max()) > 0.99  # covers [0, 1]
    lo, hi = annealed_t_range(1.0)
    t1 = sample_t(20000, t_min=lo, t_max=hi, generator=g)
    assert float(t1.min()) >= 0.5 and float(t1.max()) <= 1.0  # every t is on the data side
    # the x_t the DM loss sees at the end is mostly data: x_t = t x + (1 - t) eps with t >= 0.5


@pytest.mark.slow
def test_dino_reference_is_the_tokenizers_own_latents(tmp_path, monkeypatch):
    """App. A.2: the reference set is the frozen encoder + projector of the pretrained tokenizer on the
    training images (and flips), normalised by its statistics; so DMD starts *at* the reference: at step 0
    the matching distance is far below that of the feature-autoencoder reduction of the same images."""
    from trainers.launch import ensure
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    base = preset("smoke", [f"run.out_dir={tmp_path}", "tokenizer.backbone=dinov2_vits14", *MICRO])
    cfg = resolve(base, "dinov2")
    assert cfg.prior.reduction == "tokenizer" and cfg.tokenizer.backbone == "dinov2_vits14"
    ensure("reference", cfg, LaunchOptions())
    ref = ReferenceSet.load(artifact(cfg, "reference"))
    tok_art = artifact(cfg, "tokenizer")  # the row's own tokenizer: the one DMD trains
    assert ref.provenance["tokenizer"] == tok_art.path.name and ref.exact
    tok = load_tokenizer(tok_art)
    from priors.extract import training_items
    from priors.registry import BuildContext
    items = training_items(BuildContext(cfg=cfg, art=tok_art))
    img = torch.stack([items.dataset[i][0] for i in range(len(items))])
    with torch.no_grad():
        want = torch.cat([tok.normalize(tok.encode(img)), tok.normalize(tok.encode(img.flip(-1)))])
    assert ref.x.shape == want.shape == (96, 4, 4, 4)
    torch.testing.assert_close(ref.x, want, rtol=1e-5, atol=1e-6)  # float32 rounding (batching)
    assert ref.mean == pytest.approx(float(tok.latent_mean)) and ref.scale == pytest.approx(float(tok.latent_scale))
    # DMD step 0: the latents of a batch of training images against each reference
    with torch.no_grad():
        x0 = tok.normalize(tok.encode(img[:32]))
    feat = resolve(base.replace(prior=base.prior.replace(reduction="feature_ae", reducer_steps=50)), "dinov2")
    ensure("reference", feat, LaunchOptions())
    ref_feat = ReferenceSet.load(artifact(feat, "reference"))
    g = torch.Generator().manual_seed(0)
    sw_tok = sliced_wasserstein(x0, ref.x[torch.randint(0, len(ref), (32,), generator=g)], seed=0)
    sw_feat = sliced_wasserstein(x0, ref_feat.x[torch.randint(0, len(ref_feat), (32,), generator=g)], seed=0)
    print(f"SW at DMD step 0: tokenizer reference {sw_tok:.3f}, feature_ae reference {sw_feat:.3f}")
    assert sw_tok < 0.5 * sw_feat, (sw_tok, sw_feat)


def test_baselines_are_conv_autoencoders_not_dino():
    """Table 1's VAE baseline and VA-VAE: the f16d32 conv autoencoder of the VA-VAE repository, trained
    from scratch, with no DINOv2 parameter in the encoder (VA-VAE only *aligns* to DINOv2 features)."""
    cfg = preset("imagenet256")
    for row in ("vae", "vavae"):
        r = resolve(cfg, row)
        assert r.tokenizer.backbone == "ldm_conv" and r.tokenizer.encoder_ch_mult == (1, 1, 2, 2, 4)
        with torch.device("meta"):
            tok = build_tokenizer(r, "beta_vae" if row == "vae" else "vavae", device="meta")
        names = [n for n, _ in tok.encoder.named_parameters()]
        assert names and not any("vit" in n or "dinov2" in n or "blocks." in n for n in names)
        assert all(p.requires_grad for p in tok.encoder.parameters())  # trained from scratch
    assert resolve(cfg, "dinov2").tokenizer.backbone == "dinov2_vitl14"  # the DMVAE rows keep DINOv2
    assert resolve(cfg, "vavae").tokenizer.vavae_backbone == "dinov2_vitl14"


def test_vavae_vf_loss_matches_a_float64_recomputation():
    from dmvae_study.objectives.vavae import vf_alignment_loss
    g = torch.Generator().manual_seed(0)
    z, f = torch.randn(3, 12, 4, 4, generator=g), torch.randn(3, 12, 4, 4, generator=g)
    loss, _ = vf_alignment_loss(z, f, cos_margin=0.5, distmat_margin=0.25)
    zd, fd = z.double().flatten(2), f.double().flatten(2)  # (B, D, N)
    total_cos, total_dm = 0.0, 0.0
    for b in range(3):
        zn = zd[b] / zd[b].norm(dim=0, keepdim=True)
        fn = fd[b] / fd[b].norm(dim=0, keepdim=True)
        cos = (zn * fn).sum(0)
        total_cos += float(torch.clamp(1 - 0.5 - cos, min=0).mean())
        total_dm += float(torch.clamp((zn.T @ zn - fn.T @ fn).abs() - 0.25, min=0).mean())
    assert float(loss) == pytest.approx(total_cos / 3 + total_dm / 3, rel=1e-5)


def test_official_dmd_optimisation_in_the_imagenet256_config():
    """official scripts/train_dmd.sh + train_dmd.py: lr 2e-5 (VAE, fake net, discriminator), AdamW (0.9, 0.95),
    weight decay 0.005 (5e-4 discriminator), clip 1.0, 1000-step linear warmup, GAN from step 5000."""
    d = resolve(preset("imagenet256"), "dinov2").dmd
    assert (d.lr, d.fake_lr, d.disc_lr) == (2e-5, 2e-5, 2e-5) and d.betas == (0.9, 0.95)
    assert (d.weight_decay, d.disc_weight_decay) == (0.005, 5e-4)
    assert (d.grad_clip, d.fake_grad_clip, d.warmup_steps, d.gan_start) == (1.0, 1.0, 1000, 5000)
    assert d.tokenizer_out == "raw" and d.total_steps == 300_000 and d.dm_weight == 10.0
    t = resolve(preset("imagenet256"), "dinov2")
    assert t.teacher.time_sampling == "uniform" and t.generator.time_sampling == "uniform"  # train_diffusion.py


def test_clipping_and_warmup_act():
    """Two optimiser steps: the first update of a linear warmup has lr 0 (the official lr_lambda), the second
    lr/warmup; the gradient is clipped to norm 1.0 before the update."""
    from dmvae_study.config import DMDConfig
    from trainers.common import Optim
    w = torch.nn.Parameter(torch.zeros(4))
    sec = DMDConfig(lr=0.1, warmup_steps=10, grad_clip=1.0, weight_decay=0.0)
    opt = Optim([w], sec, torch.device("cpu"))
    gn = opt.step((w * torch.tensor([30.0, 40.0, 0.0, 0.0])).sum())  # gradient norm 50
    assert float(gn) == pytest.approx(50.0) and torch.equal(w.detach(), torch.zeros(4))  # lr 0 at update 0
    assert opt.opt.param_groups[0]["lr"] == pytest.approx(0.1 / 10)
    opt.step((w * torch.tensor([30.0, 40.0, 0.0, 0.0])).sum())
    # Adam's first real step moves each coordinate by ~lr (sign of the clipped gradient), lr = 0.01
    assert torch.allclose(w.detach(), torch.tensor([-0.01, -0.01, 0.0, 0.0]), atol=1e-4)
    for p in opt.params:  # the clip acted on the stored gradient
        assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_gfid_reference_is_class_balanced_on_a_sorted_folder(tmp_path):
    """A sorted 20-class folder: the reference subset holds every class in equal share (+-1), not the
    first classes (today's ImageNet folders list n01440764 ... first)."""
    rng = np.random.default_rng(0)
    for c in range(20):
        d = tmp_path / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(7 + c % 3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    ds = build_dataset(preset("smoke", ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=20",
                                        "data.resolution=8", "data.train_limit=null"]).data, "train")
    from dmvae_study.data import dataset_targets
    targets = dataset_targets(ds)
    assert targets == sorted(targets)  # class-sorted, as ImageNet folders are
    for n in (50, 100, 133):
        idx = balanced_subset(targets, n, seed=3)
        counts = np.bincount([targets[i] for i in idx], minlength=20)
        assert len(idx) == n == len(set(idx)) and counts.max() - counts.min() <= 1, counts
    assert balanced_subset(targets, 50, seed=3) == balanced_subset(targets, 50, seed=3)


def test_sampling_labels_are_balanced():
    from trainers.evaluate import balanced_labels
    for n, c in ((5000, 1000), (2000, 10), (64, 10), (7, 3)):
        counts = torch.bincount(balanced_labels(n, c), minlength=c)
        assert int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1


def test_table2_axes_and_ablation_steps(tmp_path, capsys):
    """Table 2 as the paper ran it: DM weight 1, 20, 100 besides the default 10; 250k DMD iterations in the
    ablations at imagenet256 (Sec. 5.1) against Table 1's 300k; every axis listed in the table caption."""
    from studies import ablations
    assert ablations.AXES["dm_weight"][1] == [1.0, 10.0, 20.0, 100.0]
    ablations.main(["--preset", "imagenet256", "--axis", "dm_weight", "--out", str(tmp_path), "--print-config",
                    "--set", "run.allow_random_weights=true", "--set", "prior.ldm_source=baseline_vae"])
    out = capsys.readouterr().out
    assert out.count("total_steps: 250000") >= 4 and "total_steps: 300000" not in out.split("dmd:")[1][:400]
    assert math.isclose(resolve(preset("imagenet256"), "dinov2").dmd.total_steps, 300_000)


def test_a_prior_backbone_tokenizer_uses_its_own_feature_layer():
    """The mini preset's tokenizer reads Lite0's `block10`; the ResNet-34 prior's reference tokenizer (A.1
    recipe, that backbone) must read a ResNet-34 layer, not inherit Lite0's layer name, and build."""
    from priors import get
    cfg = resolve(preset("mini"), "resnet34")
    assert cfg.tokenizer.backbone_layer == "block10"
    stage, ref_cfg = get("resnet34").needs(cfg)["tokenizer"]
    assert stage == "tokenizer" and ref_cfg.tokenizer.backbone == "resnet34"
    assert ref_cfg.tokenizer.backbone_layer is None and ref_cfg.tokenizer.freeze_backbone
    cfg = cfg.replace(run=cfg.run.replace(allow_random_weights=True))
    ref_cfg = ref_cfg.replace(run=ref_cfg.run.replace(allow_random_weights=True))
    grid = lambda c: build_tokenizer(c, "ae", device="meta").encode(torch.zeros(1, 1, 32, 32, device="meta")).shape
    assert grid(ref_cfg) == grid(cfg)  # the same latent grid as the row's own tokenizer


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_dmd_trains_the_lite0_encoder_without_stochastic_depth(drop_path):
    """The official DMD encoder is timm's DINOv2 with drop_path_rate 0: in train mode it computes the same
    deterministic latents as in eval mode, so DMD's first step sees the reference's latents (A.2) and the fake
    score fits what the generator outputs. The `efficientnet_lite_pytorch` package builds Lite0 (the mini
    preset's stand-in) with drop connect 0.2, which train mode applies; `dmd.encoder_drop_path` (default 0)
    says what the DMD stage uses, and 0.2 reproduces the runs before this setting existed."""
    from benchmarks.bench_dmd import DMDStep
    s = DMDStep("mini", "tiny", batch=4, device=torch.device("cpu"), precision="fp32", cfg_scale=1.0,
                vae_every=5, lpips=None, seed=0, overrides=[f"dmd.encoder_drop_path={drop_path}"])
    tok = s.state.tok
    assert tok.encoder.backbone.drop_path == drop_path and not tok.encoder.backbone_frozen
    img = s.img_pool[:4]
    with torch.no_grad():
        tok.train()
        z1, z2 = tok.encode(img), tok.encode(img)
        tok.eval()
        z_eval = tok.encode(img)
    tok.train()
    if drop_path == 0:
        torch.testing.assert_close(z1, z_eval, rtol=0, atol=0)
        torch.testing.assert_close(z2, z_eval, rtol=0, atol=0)
    else:  # drop connect drops whole residual branches per sample in train mode
        assert (z1 - z_eval).abs().max() > 1e-3 and (z1 - z2).abs().max() > 1e-3


def test_encoder_drop_path_needs_a_backbone_with_stochastic_depth():
    from dmvae_study.configlib import ConfigError
    with pytest.raises(ConfigError, match="dmd.encoder_drop_path"):
        preset("smoke", ["dmd.encoder_drop_path=0.1"])
    assert preset("mini", ["dmd.encoder_drop_path=0.2"]).dmd.encoder_drop_path == 0.2
