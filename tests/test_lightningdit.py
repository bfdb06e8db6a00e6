"""LightningDiT: parameter counts against a closed form, forward/backward of the tiny preset, CFG,
checkpointing, label dropout, RoPE's relative-position property, and (when the official DMVAE repo is
available) output equality with the official module. Random-init tiny models on purpose: no weights here."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dmvae_study.models.lightningdit import (LIGHTNINGDIT_PRESETS, LightningDiT, apply_rope, build_lightningdit,
                                             convert_official_state_dict, rope_tables)

torch.set_num_threads(1)


def tiny(**kw) -> LightningDiT:
    args = dict(in_channels=4, input_size=8, patch_size=1, num_classes=10, class_dropout=0.1)
    args.update(kw)
    torch.manual_seed(0)
    return build_lightningdit("tiny", **args)


def randomize_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """AdaLN-Zero makes a fresh model output 0 with most gradients 0; perturb to exercise every path."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def expected_params(depth: int, H: int, heads: int, C: int, p: int, K: int, mlp_ratio: float = 4.0) -> int:
    """Closed-form count of the architecture (SwiGLU width int(2/3 int(4H)), RMSNorm, QK-norm, AdaLN)."""
    m, hd, o = int(2 / 3 * int(H * mlp_ratio)), H // heads, p * p * C
    block = (3 * H * H + 3 * H) + (H * H + H) + 2 * hd + 2 * H + (2 * H * m + 2 * m) + (m * H + H) + (6 * H * H + 6 * H)
    embed = (C * p * p * H + H) + (256 * H + H + H * H + H) + (K + 1) * H
    final = H + (H * o + o) + (2 * H * H + 2 * H)
    return depth * block + embed + final


def test_param_counts_all_presets():
    for name, (depth, H, heads) in LIGHTNINGDIT_PRESETS.items():
        with torch.device("meta"):
            m = build_lightningdit(name, in_channels=32, input_size=16, num_classes=1000)
        n = sum(p.numel() for p in m.parameters())
        print(f"LightningDiT-{name}/1 (32ch, 16x16, 1000 classes): {n:,} params ({n / 1e6:.2f}M)")
        assert n == expected_params(depth, H, heads, 32, 1, 1000)
        if name == "XL":  # paper App. A.2: "LightningDiT-XL ... (675M parameters)"
            assert abs(n - 675e6) / 675e6 < 0.005


def test_unknown_size_lists_choices():
    with pytest.raises(ValueError, match="tiny, Mini, S, B, L, XL"):
        build_lightningdit("XXL", in_channels=4, input_size=8, num_classes=10)


def test_zero_init_outputs_zero():
    m = tiny().eval()
    assert torch.equal(m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])), torch.zeros(2, 4, 8, 8))


@pytest.mark.parametrize("patch_size,size", [(1, 8), (2, 8), (2, (4, 8))])
def test_forward_backward_float32(patch_size, size):
    m = randomize_zero_init(tiny(patch_size=patch_size, input_size=size)).train()
    H, W = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, 4, H, W)
    v = m(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert v.shape == x.shape and v.dtype == torch.float32
    v.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_flags_off_plain_dit():
    """use_rope / use_qknorm / use_swiglu / use_rmsnorm off: a DiT with LayerNorm and a 4H GELU MLP."""
    m = randomize_zero_init(tiny(use_rope=False, use_qknorm=False, use_swiglu=False, use_rmsnorm=False))
    assert m.blocks[0].mlp.fc1.out_features == 4 * 64
    v = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    v.square().mean().backward()
    assert torch.isfinite(v).all() and v.shape == (2, 4, 8, 8)


def test_bfloat16_autocast_and_cast():
    m = randomize_zero_init(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7])
    ref = m(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = m(x, t, y)
    v.float().square().mean().backward()
    assert torch.isfinite(v.float()).all()
    assert (v.float() - ref).norm() / ref.norm() < 0.05
    mb = tiny().to(torch.bfloat16)
    mb.load_state_dict({k: w.to(torch.bfloat16) for k, w in m.state_dict().items()})
    vb = mb(x.to(torch.bfloat16), t, y)
    assert vb.dtype == torch.bfloat16
    vb.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in mb.parameters())
    assert (vb.float() - ref).norm() / ref.norm() < 0.05


def test_token_input_mode():
    """2D points as one token (toy study, App. A): (B, C) and (B, C, 1, 1) agree and keep their shape."""
    m = randomize_zero_init(tiny(in_channels=2, input_size=1, num_classes=1)).eval()
    x, t = torch.randn(5, 2), torch.rand(5)
    v = m(x, t)
    assert v.shape == (5, 2)
    assert torch.allclose(v, m(x[:, :, None, None], t)[:, :, 0, 0])
    v.sum().backward()


def test_forward_cfg_matches_two_passes():
    m = randomize_zero_init(tiny()).train()  # train mode: forward_cfg must not drop labels at random
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    m.eval()
    v_cond, v_null = m(x, t, y), m(x, t, None)
    m.train()
    assert torch.allclose(m.forward_cfg(x, t, y, 3.0), v_null + 3.0 * (v_cond - v_null), atol=1e-5)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(m.forward_cfg(x, t, y, w), v_null + w[:, None, None, None] * (v_cond - v_null), atol=1e-5)
    assert torch.allclose(m.forward_cfg(x, t, y, 1.0), v_cond, atol=1e-6)


def test_grad_checkpointing_equivalence():
    m = randomize_zero_init(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        m.grad_checkpointing = flag
        m.zero_grad()
        v = m(x, t, y)
        v.square().mean().backward()
        grads.append((v.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_label_dropout():
    m = tiny(class_dropout=0.5)
    emb, null = m.y_embedder, m.y_embedder.embedding_table.weight[10]
    y = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(1)
    dropped = (emb(y, 4000, y.device) == null).all(1).float().mean()
    assert abs(dropped - 0.5) < 0.04  # binomial std 0.008
    m.eval()
    assert not (emb(y, 4000, y.device) == null).all(1).any()
    forced = emb(y[:3], 3, y.device, force_drop=torch.tensor([True, False, True]))
    assert (forced[[0, 2]] == null).all() and not (forced[1] == null).all()
    assert torch.equal(emb(None, 2, y.device), null.expand(2, -1))


def test_rope_relative_positions():
    """RoPE: <R(p) q, R(p') k> depends only on p - p' (per axis); independent of the code's layout."""
    h = w = 4
    cos, sin = rope_tables(h, w, 16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq = apply_rope(q.expand(1, 1, h * w, 16).clone(), cos.double(), sin.double())[0, 0].reshape(h, w, 16)
    rk = apply_rope(k.expand(1, 1, h * w, 16).clone(), cos.double(), sin.double())[0, 0].reshape(h, w, 16)
    assert torch.allclose((rq[1, 2] * rk[0, 1]).sum(), (rq[3, 3] * rk[2, 2]).sum())
    assert torch.allclose((rq[0, 0] * rk[0, 0]).sum(), (q * k).sum())
    assert not torch.allclose((rq[1, 0] * rk[0, 0]).sum(), (rq[0, 1] * rk[0, 0]).sum())  # axes differ


OFFICIAL = Path(os.environ.get("DMVAE_OFFICIAL_REPO", "/work/.mirror/sen-ye+dmvae/repo"))


@pytest.mark.skipif(not OFFICIAL.exists(), reason="official sen-ye/dmvae repo not available (DMVAE_OFFICIAL_REPO)")
def test_matches_official_lightningdit(tmp_path, monkeypatch):
    """Load random official weights into ours; outputs agree (einops/fairscale stubbed, compile disabled)."""
    pkg = tmp_path / "official"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in ("lightningdit.py", "swiglu_ffn.py", "pos_embed.py", "rms_norm.py"):
        src = subprocess.run(["git", "-C", str(OFFICIAL), "show", f"HEAD:diffusion/lightningdit/{f}"],
                             capture_output=True, text=True, check=True).stdout
        (pkg / f).write_text(src)
    ein = types.ModuleType("einops")
    ein.rearrange = lambda x, pat, r=None: x.flatten(-2) if pat.endswith("(d r)") else x.unflatten(-1, (-1, r))
    ein.repeat = lambda x, pat, r: x.repeat_interleave(r, -1)
    monkeypatch.setitem(sys.modules, "einops", ein)
    for n in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
              "fairscale.nn.model_parallel.layers"):
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    for n in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(sys.modules["fairscale.nn.model_parallel.layers"], n, object)
    monkeypatch.setattr(torch, "compile", lambda f=None, **k: f if f is not None else (lambda g: g))
    monkeypatch.syspath_prepend(str(tmp_path))
    from official.lightningdit import LightningDiT as Official
    all_off = dict(use_rope=False, use_qknorm=False, use_swiglu=False, use_rmsnorm=False)
    for depth, hid, heads, p, size, C, flags in [(2, 64, 2, 1, 4, 4, {}), (2, 128, 4, 2, 8, 3, {}),
                                                 (1, 64, 2, 1, 1, 2, {}), (2, 64, 2, 2, 4, 3, all_off)]:
        torch.manual_seed(0)
        off = Official(input_size=size, patch_size=p, in_channels=C, hidden_size=hid, depth=depth, num_heads=heads,
                       num_classes=5, class_dropout_prob=0.1, **flags).eval()
        with torch.no_grad():
            for n, w in off.named_parameters():
                if n != "pos_embed":
                    w.normal_(0, 0.2)
        ours = LightningDiT(in_channels=C, input_size=size, patch_size=p, hidden_size=hid, depth=depth,
                            num_heads=heads, num_classes=5, **flags).eval()
        ours.load_state_dict(convert_official_state_dict(off.state_dict(), 5), strict=True)
        x, t, y = torch.randn(3, C, size, size), torch.rand(3), torch.tensor([0, 4, 5])
        a, b = off(x, t, y), ours(x, t, y)
        assert (a - b).abs().max() < 1e-4 * a.abs().max()
