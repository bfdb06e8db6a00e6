"""Tokenizer parts (encoder, decoder, latent normalisation, beta-VAE), projection heads, PatchGAN +
DiffAugment, the reconstruction / GAN objective and the VA-VAE alignment loss.

All networks are small and random-init on purpose (no pretrained weights are obtainable offline);
LPIPS runs with a random trunk (`pnet_rand=True`). References: torch.distributions for the KL, a
float64 recomputation for latent statistics, hand-computed grad-norm ratios for the adaptive weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmvae_study.models.autoencoder import Encoder, MLPProjector, SmallConvEncoder, Tokenizer
from dmvae_study.models.decoder import DECODER_PRESETS, Decoder
from dmvae_study.models.discriminator import NLayerDiscriminator
from dmvae_study.objectives.gan import diff_augment, hinge_d_loss
from dmvae_study.models.heads import MLPHead, QueryDecoderHead, build_head
from dmvae_study.objectives.recon import ReconstructionLoss, build_lpips, kl_loss, reconstruction_loss
from dmvae_study.models.autoencoder import AlignmentProjection
from dmvae_study.objectives.vavae import VAVAEAlignmentLoss, vf_alignment_loss
from dmvae_study.weights import MissingWeightsError

torch.set_num_threads(1)


def tiny_tokenizer(res_stride: int = 8, kind: str = "ae", C: int = 4, ch_mult=(1, 2, 2, 2), in_upsample=False,
                   freeze_backbone: bool = True) -> Tokenizer:
    bb = SmallConvEncoder(width=8, stride=res_stride)
    enc = Encoder(bb, MLPProjector(bb.out_channels, 16, C * (2 if kind == "beta_vae" else 1)), freeze_backbone)
    dec = Decoder(C, ch=8, ch_mult=ch_mult, num_res_blocks=1, mid_attention=True, in_upsample=in_upsample)
    return Tokenizer(enc, dec, kind, C)


# ---- encoder / decoder / tokenizer ------------------------------------------------------------------

@pytest.mark.parametrize("res, stride, ch_mult, in_up", [(32, 8, (1, 2, 2, 2), False), (64, 16, (1, 2, 2, 2), True),
                                                          (64, 8, (1, 2, 2, 2), False)])
def test_tokenizer_shapes(res, stride, ch_mult, in_up):
    tok = tiny_tokenizer(stride, ch_mult=ch_mult, in_upsample=in_up)
    img = torch.rand(2, 3, res, res) * 2 - 1
    rec, z, aux = tok(img)
    assert z.shape == (2, 4, res // stride, res // stride) and rec.shape == img.shape and aux == {}
    assert tok.decoder.stride == stride and torch.equal(tok.encode(img), z)
    assert tok.decode(z).shape == img.shape


def test_decoder_stride_follows_ch_mult():
    assert Decoder(4, ch=8, ch_mult=(1,)).stride == 1
    assert Decoder(4, ch=8, ch_mult=(1, 2, 2)).stride == 4
    assert Decoder(4, ch=8, ch_mult=(1, 2, 2), in_upsample=True).stride == 8
    assert {k: Decoder(4, **{**v, "ch": 8}).stride for k, v in DECODER_PRESETS.items()} == \
        {"tiny": 4, "small": 8, "flux_official": 16, "flux_f16": 16}
    with pytest.raises(ValueError, match="latents"):
        Decoder(4, ch=8, ch_mult=(1, 2))(torch.zeros(1, 3, 4, 4))


def test_projector_is_per_token_mlp():
    p = MLPProjector(6, 10, 3)
    x = torch.randn(2, 6, 4, 5)
    ref = p.fc2.weight[:, :, 0, 0] @ torch.nn.functional.silu(p.fc1.weight[:, :, 0, 0] @ x[0, :, 1, 2] + p.fc1.bias) \
        + p.fc2.bias
    assert torch.allclose(p(x)[0, :, 1, 2], ref, atol=1e-6)


def test_frozen_backbone_gets_no_grads_and_stays_in_eval():
    tok = tiny_tokenizer(freeze_backbone=True)
    tok.train()
    assert not tok.encoder.backbone.training and tok.encoder.projector.training
    rec, z, _ = tok(torch.rand(2, 3, 32, 32))
    rec.mean().backward()
    assert all(p.grad is None for p in tok.encoder.backbone.parameters())
    assert all(p.grad is not None for p in tok.encoder.projector.parameters())
    tok.encoder.set_backbone_frozen(False)  # the DMD stage trains the whole encoder (Sec. 3.1)
    tok.train()
    tok(torch.rand(2, 3, 32, 32))[0].mean().backward()
    assert tok.encoder.backbone.training and all(p.grad is not None for p in tok.encoder.backbone.parameters())


def test_channel_mismatch_is_rejected():
    enc = Encoder(SmallConvEncoder(width=8, stride=8), MLPProjector(32, 16, 4))
    with pytest.raises(ValueError, match="8 output channels"):
        Tokenizer(enc, Decoder(4, ch=8, ch_mult=(1, 2)), "beta_vae", 4)
    with pytest.raises(ValueError, match="latent channels"):
        Tokenizer(enc, Decoder(5, ch=8, ch_mult=(1, 2)), "ae", 4)


def test_latent_normalisation_roundtrip_and_measured_stats():
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 4, 4, 4, generator=g) * 5.7 + 0.07 for n in (3, 8, 5)]
    mean, std = tok.measure_latent_stats(iter(batches))
    allz = torch.cat([b.double().reshape(-1) for b in batches])
    assert math.isclose(mean, allz.mean().item(), rel_tol=1e-9) and math.isclose(std, allz.std().item(), rel_tol=1e-9)
    z = batches[1]
    zn = tok.normalize(z)
    assert abs(float(zn.mean())) < 0.2 and abs(float(zn.std()) - 1) < 0.1
    assert torch.allclose(tok.denormalize(zn), z, atol=1e-5)
    sd = tok.state_dict()
    assert float(sd["latent_mean"]) == pytest.approx(mean) and float(sd["latent_scale"]) == pytest.approx(std)
    tok.set_latent_stats(0.0685, official_scale=0.1763)  # released DMVAE values: (z - m) * 0.1763
    assert torch.allclose(tok.normalize(z), (z - 0.0685) * 0.1763, atol=1e-5)


def test_beta_vae_posterior_and_kl_against_torch_distributions():
    torch.manual_seed(0)
    tok = tiny_tokenizer(kind="beta_vae")
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    mean, logvar, sample = tok.encode_dist(img)
    assert mean.shape == logvar.shape == sample.shape == (3, 4, 4, 4)
    assert torch.equal(tok.encode(img), mean)
    rec, z, aux = tok(img)
    assert rec.shape == img.shape and set(aux) == {"mean", "logvar"}
    assert torch.allclose(tok(img, sample_posterior=False)[1], mean)
    m = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    lv = torch.randn(4, 2, 3, 3, dtype=torch.float64) * 0.5
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(torch.zeros_like(m), torch.ones_like(m)))
    assert torch.allclose(kl_loss(m, lv).double(), ref.sum(dim=(1, 2, 3)).mean(), rtol=1e-6)
    assert torch.allclose(kl_loss(m, lv, "mean").double(), ref.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="beta_vae"):
        tiny_tokenizer().encode_dist(img)


# ---- heads -----------------------------------------------------------------------------------------

def test_heads_choose_and_shape():
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    assert isinstance(build_head((4, 4, 4), (4, 4, 4)), nn.Identity)
    assert isinstance(build_head((4, 4, 4), (8, 4, 4)), MLPHead)
    for ref in [(8, 2, 2), (16, 8), (32,), (3, 8, 8)]:
        head = build_head((4, 4, 4), ref, hidden=32)
        assert isinstance(head, QueryDecoderHead)
        out = head(z)
        assert out.shape == (2, *ref)
        out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert build_head((4, 4, 4), (8, 4, 4), kind="query")(z).shape == (2, 8, 4, 4)


def test_head_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(8, 4, 4\).*head kind"):
        build_head((4, 4, 4), (8, 4, 4), kind="none")
    with pytest.raises(ValueError, match="spatially aligned"):
        build_head((4, 4, 4), (8, 2, 2), kind="mlp")
    with pytest.raises(ValueError, match="grid"):
        MLPHead(4, 8, spatial=(4, 4))(torch.randn(1, 4, 2, 2))
    assert isinstance(build_head((4, 4, 4), (4, 4, 4), kind="none"), nn.Identity)


# ---- discriminator, DiffAugment --------------------------------------------------------------------

@pytest.mark.parametrize("res, n_layers, norm, side", [(32, 2, "batch", 6), (32, 3, "group", 2), (256, 3, "batch", 30)])
def test_patchgan_logit_map(res, n_layers, norm, side):
    d = NLayerDiscriminator(ndf=8, n_layers=n_layers, norm=norm)
    assert d(torch.randn(2, 3, res, res)).shape == (2, 1, side, side)


def test_diffaug_is_differentiable_and_seeded():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(inp):
        return diff_augment(inp, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.equal(f(x), f(x)) and not torch.equal(f(x), x)
    assert torch.equal(diff_augment(x, ""), x)
    # translation alone is a zero-filled shift: each output pixel is an input pixel or 0
    y = diff_augment(x, "translation", generator=torch.Generator().manual_seed(1))
    vals = set(x.detach().flatten().tolist()) | {0.0}
    assert all(v in vals for v in y.detach().flatten().tolist())
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, "rotate")


# ---- reconstruction / GAN objective ----------------------------------------------------------------

class CountingDisc(NLayerDiscriminator):
    calls = 0

    def forward(self, x):
        CountingDisc.calls += 1
        return super().forward(x)


def test_gan_term_off_before_disc_start_and_adaptive_after():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    disc = CountingDisc(ndf=8, n_layers=2)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    crit = ReconstructionLoss(lpips_weight=0.0, disc_start=10, diffaug="")
    rec = tok(img)[0]
    loss, stats = crit(img, rec, step=9, disc=disc, last_layer=tok.last_layer)
    assert CountingDisc.calls == 0 and float(stats["gan/d_weight"]) == 0.0
    assert torch.allclose(loss, (rec - img).abs().mean())

    disc.train()
    loss, stats = crit(img, rec, step=10, disc=disc, last_layer=tok.last_layer)
    assert CountingDisc.calls == 1 and disc.training            # eval inside, mode restored
    # independent adaptive weight: 0.5 * ||d rec/d W|| / ||d gan/d W|| at the decoder's last conv
    l1 = (rec - img).abs().mean()
    disc.eval()
    g = -disc(rec).mean()
    disc.train()
    W = tok.decoder.conv_out.weight
    n1 = torch.autograd.grad(l1, W, retain_graph=True)[0].norm()
    n2 = torch.autograd.grad(g, W, retain_graph=True)[0].norm()
    w_ref = 0.5 * n1 / (n2 + 1e-6)
    assert torch.allclose(stats["gan/d_weight"], w_ref, rtol=1e-5)
    assert torch.allclose(loss, l1 + w_ref * g, rtol=1e-5)
    for p in disc.parameters():
        p.grad = None
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and tok.decoder.conv_out.weight.grad is not None
    with pytest.raises(ValueError, match="last layer"):
        crit(img, rec, step=10, disc=disc)


def test_discriminator_step_hinge_and_bcr():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    img, rec = torch.rand(3, 3, 32, 32) * 2 - 1, (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True)
    crit = ReconstructionLoss(diffaug="", bcr_weight=0.0)
    loss, stats = crit.discriminator_loss(disc, img, rec)
    logits = disc(torch.cat([img, rec.detach()]))
    ref = 0.5 * (torch.relu(1 - logits[:3]).mean() + torch.relu(1 + logits[3:]).mean())
    assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(loss, hinge_d_loss(logits[:3], logits[3:]))
    loss.backward()
    assert rec.grad is None and all(p.grad is not None for p in disc.parameters())
    loss2, stats2 = ReconstructionLoss(bcr_weight=1.0).discriminator_loss(disc, img, rec, torch.Generator().manual_seed(0))
    assert stats2["loss/bcr"] > 0 and torch.isfinite(loss2)


def test_lpips_term_and_missing_weights_message(tmp_path):
    lp = build_lpips("alex", pnet_rand=True)  # random trunk: plumbing only, not a perceptual distance
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    same, st = reconstruction_loss(img, img, lp)
    other, st2 = reconstruction_loss(img, img.flip(-1), lp)
    assert float(same) == pytest.approx(0.0, abs=1e-6) and st2["loss/lpips"] > 0 and other > st2["loss/l1"]
    with pytest.raises(MissingWeightsError, match="alexnet"):
        build_lpips("alex", weights_dir=tmp_path)


# ---- VA-VAE ------------------------------------------------------------------------------------------

def test_vavae_loss_zero_when_aligned_positive_otherwise():
    f = torch.randn(2, 6, 4, 4)
    ident = nn.Identity()
    crit = VAVAEAlignmentLoss(adaptive=False)
    loss, stats = crit(f, f, ident)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(crit(f + 0.01 * torch.randn_like(f), f, ident)[0]) == pytest.approx(0.0, abs=1e-6)  # inside margins
    loss_neg, st = crit(-f, f, ident)
    # cos = -1 everywhere: relu(1 - 0.5 + 1) = 1.5; Gram matrices are equal for -f, so the distmat term is 0
    assert float(st["vf/cos"]) == pytest.approx(1.5, rel=1e-5) and float(st["vf/distmat"]) == pytest.approx(0, abs=1e-6)
    assert float(loss_neg) == pytest.approx(0.1 * 1.5, rel=1e-5)
    l_rand, st_r = vf_alignment_loss(torch.randn(2, 6, 4, 4), f)
    assert st_r["vf/distmat"] > 0 and l_rand > 0
    with pytest.raises(ValueError, match="share"):
        vf_alignment_loss(torch.randn(2, 6, 2, 2), f)


def test_vavae_adaptive_weight_matches_grad_norm_ratio():
    torch.manual_seed(0)
    tok = tiny_tokenizer(kind="beta_vae", freeze_backbone=False)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = torch.randn(2, 12, 4, 4)
    proj = AlignmentProjection(4, 12)
    rec, z, _ = tok(img)
    l_rec = (rec - img).abs().mean()
    W = tok.encoder.last_layer
    loss, stats = VAVAEAlignmentLoss()(z, feats, proj, rec_loss=l_rec, last_layer=W)
    l_vf, _ = vf_alignment_loss(proj(z), feats)
    n1 = torch.autograd.grad(l_rec, W, retain_graph=True)[0].norm()
    n2 = torch.autograd.grad(l_vf, W, retain_graph=True)[0].norm()
    assert torch.allclose(stats["vf/weight"], 0.1 * n1 / (n2 + 1e-4), rtol=1e-5)
    assert torch.allclose(loss, stats["vf/weight"] * l_vf, rtol=1e-5)
    loss.backward()
    assert proj.proj.weight.grad is not None and tok.decoder.conv_out.weight.grad is None
