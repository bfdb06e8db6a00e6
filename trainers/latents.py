"""The stage-2 latent cache (App. A.5): the final tokenizer's latents of every training image (and its
horizontal flip), normalised by the tokenizer's measured mean / scale, encoded once so the stage-2
DiT loop never re-runs the encoder (the official loop re-encodes every image on every step)."""

from __future__ import annotations

from typing import Any

import torch

from dmvae_study.build import for_inference, load_tokenizer
from dmvae_study.config import ExperimentConfig
from dmvae_study.data import build_dataset
from dmvae_study.pipeline import LaunchOptions, input_artifact
from dmvae_study.store import ArtifactDir, load_torch, save_torch
from trainers.common import StageContext, run_stage


@torch.no_grad()
def run(ctx: StageContext, art: ArtifactDir) -> dict[str, Any]:
    cfg = ctx.cfg
    summary: dict[str, Any] = {}
    if ctx.is_main:
        tok = for_inference(load_tokenizer(input_artifact(cfg, "latents", "tokenizer"), ctx.device))
        ds = build_dataset(cfg.data, "train", hflip=False)
        zs, ys = [], []
        bs = cfg.eval.batch_size  # the feature batch
        for start in range(0, len(ds), bs):
            items = [ds[i] for i in range(start, min(start + bs, len(ds)))]
            img = torch.stack([a for a, _ in items]).to(ctx.device)
            y = torch.tensor([b for _, b in items])
            for v in ([img, img.flip(-1)] if cfg.generator.flip_cache else [img]):
                with ctx.autocast():
                    zs.append(tok.normalize(tok.encode(v)).float().cpu())
                ys.append(y)
        z, y = torch.cat(zs), torch.cat(ys)
        save_torch(art.file("latents.pt"), {"z": z.to(torch.float16 if z.abs().max() < 6e4 else torch.float32), "y": y})
        summary = {"count": int(z.shape[0]), "shape": list(z.shape[1:])}
        art.mark_done(summary)
    ctx.barrier()
    return art.summary()


def load_latents(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached normalised latents `(N, C, h, w)` float32 and labels `(N,)` of a finished row."""
    from dmvae_study.pipeline import artifact
    d = load_torch(artifact(cfg, "latents").file("latents.pt"))
    return d["z"].float(), d["y"]


def train_loop(cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """Encode and cache this row's latents (reused when its artifact is finished)."""
    return run_stage("latents", cfg, opts)
