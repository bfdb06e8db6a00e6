"""Diffusion noise states: noisy latents of a pretrained LDM tokenizer at an intermediate flow time
(paper Sec. 4, Category 1; Table 1 "Difftraj").

Latents `z` of the training images come from the staged Stable Diffusion VAE (`prior.ldm_source=
"staged"`: diffusers' `AutoencoderKL` on the weights folder `sd_vae_ft_ema`, extra `[ldm]`), or from
the study's own beta-VAE baseline (`"baseline_vae"`: this prior then *needs* the `vae` row's tokenizer,
which the pipeline builds first). `"auto"` (small presets) takes the staged VAE when its weights are
present, else the beta-VAE, and the row is labelled as that stand-in. Then, in order:
reduce z per token if it has more than `reduced_dim` channels (Sec. 3.2), standardise it (overall
mean 0, std 1), and noise it to `t = prior.noise_t` on the repo's flow path (t=0 noise, t=1 data):
`x_t = t * z + (1 - t) * eps`, `eps ~ N(0, I)` from a seeded stream. The set is standardised again.
"""

from __future__ import annotations

from typing import Callable

import torch

from dmvae_study.reference import ReferenceSet
from dmvae_study.config import ExperimentConfig
from priors.extract import extract, training_items
from priors.reduce import reduce_chunks
from priors.registry import FEATURE_REDUCTIONS, BuildContext, register


def staged_ldm_encoder(ctx: BuildContext) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Encoder of the staged SD VAE (diffusers AutoencoderKL, posterior mean); untested offline."""
    from dmvae_study.weights import describe, resolve
    path = resolve("sd_vae_ft_ema", ctx.cfg.run.weights_dir)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("prior.ldm_source='staged' needs `pip install diffusers`; or use the study's "
                          "beta-VAE baseline with prior.ldm_source=baseline_vae") from None
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False).to(ctx.device)

    def encode(img: torch.Tensor) -> torch.Tensor:
        img = img.to(ctx.device)
        return vae.encode(img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img).latent_dist.mean
    return encode, describe(path)


def resolve_source(cfg: ExperimentConfig) -> ExperimentConfig:
    """`ldm_source=auto`: the staged SD-VAE when its weights folder is present, else the study's beta-VAE."""
    if cfg.prior.ldm_source != "auto":
        return cfg
    from dmvae_study.weights import MissingWeightsError, resolve
    try:
        resolve("sd_vae_ft_ema", cfg.run.weights_dir)
        source = "staged"
    except MissingWeightsError:
        source = "baseline_vae"
    return cfg.replace(prior=cfg.prior.replace(ldm_source=source))


def needs(cfg: ExperimentConfig):
    """The `vae` row's beta-VAE tokenizer when it is this prior's LDM."""
    if cfg.prior.ldm_source != "baseline_vae":
        return {}
    from dmvae_study.pipeline import resolve
    return {"ldm": ("tokenizer", resolve(cfg, "vae"))}


def stand_in(cfg: ExperimentConfig) -> str | None:
    return "the study's beta-VAE in the SD-VAE's place" if cfg.prior.ldm_source == "baseline_vae" else None


@register("ldm_noise", kind="data", order=40, reductions=FEATURE_REDUCTIONS, needs=needs, resolve=resolve_source,
          stand_in=stand_in)
def build(ctx: BuildContext) -> ReferenceSet:
    """LDM latents of the training images, standardised and noised to flow time prior.noise_t."""
    cfg = ctx.cfg
    if cfg.prior.ldm_source == "staged":
        encoder, source = staged_ldm_encoder(ctx)
    else:
        from dmvae_study.build import load_tokenizer
        tok = load_tokenizer(ctx.inputs["ldm"], ctx.device)

        def encoder(img: torch.Tensor) -> torch.Tensor:
            return tok.encode(img.to(ctx.device))  # the posterior mean of the beta-VAE
        source = f"baseline_vae:{ctx.inputs['ldm'].path.name}"
    items = training_items(ctx)
    shards = extract(ctx, items.dataset, encoder, source=source, desc="ldm_noise latents")
    z, report = reduce_chunks(shards.features, cfg.prior, counts=shards.counts, seed=ctx.seed("reducer"),
                              device=ctx.device, progress=ctx.progress)
    z = (z - z.mean()) / z.std().clamp_min(1e-8)
    t = cfg.prior.noise_t
    x_t = t * z + (1 - t) * torch.randn(z.shape, generator=ctx.generator("noise"))  # flow path, t=1 data
    return ReferenceSet.standardised(x_t, shards.labels(), num_classes=cfg.data.num_classes, provenance={
        "ldm_source": cfg.prior.ldm_source, "weights_source": source, "noise_t": t, "latent_shape": list(z.shape[1:]),
        "images": len(items), **report})
