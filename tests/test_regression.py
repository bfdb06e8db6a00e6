"""The stage-table refactor changed no number: the smoke pipeline of one row (gaussian prior, seed 0)
against the metrics the pre-refactor code produced (commit 96c6a06, `tests/data/smoke_gaussian_before_refactor.json`).

Tolerance: exact equality (CPU, same seed, same thread count: the runs are bitwise deterministic, and
were so twice in a row before the refactor). The behaviours later changed on purpose are pinned back
to the old ones (`PIN`): per-epoch flips off (the old loader never advanced the epoch), logit-normal
teacher / generator times, no DMD weight decay / clipping / warmup, the GAN term from step 0, the EMA
tokenizer out of DMD, and the DataLoader drawing its base seed from the global RNG (fixed later: that draw
shifted the stream a resumed stage restores, `loaders.OWN_GENERATOR`). Not compared, and why:
- `dmd/match/swd`: the matching measure now draws its reference samples from its own seeded stream;
- `generator/*` and `eval/*` other than PSNR: the latent cache is now its own stage, so the stage-2
  DiT's initial weights come from a fresh seeded stream (before, building the tokenizer inside the
  stage consumed it first); gFID also uses class-balanced labels, the whole-training-set reference and
  clean-fid's resize now (the fidelity changes), and these are reported by their own tests.
"""

import json
from pathlib import Path

import pytest

from dmvae_study.presets import preset
from dmvae_study.pipeline import resolve
from trainers.launch import run_pipeline

GOLDEN = Path(__file__).parent / "data" / "smoke_gaussian_before_refactor.json"
PIN = ["data.hflip=false", "teacher.time_sampling=logit_normal", "generator.time_sampling=logit_normal",
       "dmd.weight_decay=0", "dmd.disc_weight_decay=0", "dmd.grad_clip=0", "dmd.warmup_steps=0", "dmd.gan_start=0",
       "dmd.tokenizer_out=ema", "run.threads=2"]
NOT_COMPARED = {("dmd", "match/swd")}
# Bitwise equality holds per CPU model, not across models: the convolution and matmul kernels torch picks
# for the CPU round differently, and 100 training steps carry the difference into the 3rd digit. The golden
# file matches CI's machines; on an AVX-512/AMX Xeon (Sapphire Rapids class) the tokenizer's latent_mean came
# out 0.0037089 instead of 0.0035858, with the same code before and after the refactor, and pinning the kernel
# choice (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR) did not recover it.
CPU_NOTE = ("The first stage already differs: if this commit's parent passes on this machine, it is a change; "
            "if the parent fails the same way, this CPU rounds differently from the golden file's (see CPU note).")


@pytest.mark.slow
def test_smoke_row_metrics_unchanged_by_the_refactor(tmp_path, monkeypatch):
    import dmvae_study.loaders as loaders
    monkeypatch.setenv("DMVAE_NO_PROGRESS", "1")
    monkeypatch.setattr(loaders, "OWN_GENERATOR", False)
    cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", *PIN]), "gaussian")
    res = run_pipeline(cfg)
    golden = json.loads(GOLDEN.read_text())
    compared = 0
    for stage in sorted(golden, key=list(res).index):  # pipeline order: the first stage that differs is named
        for key, want in golden[stage].items():
            if (stage, key) in NOT_COMPARED or stage == "generator" or (stage == "eval" and key != "psnr"):
                continue
            assert res[stage][key] == want, (f"{stage}/{key}: {res[stage][key]!r} != {want!r} before the refactor. "
                                              f"{CPU_NOTE if stage == 'tokenizer' else ''}")
            compared += 1
    assert compared >= 20
