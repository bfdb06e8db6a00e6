"""Diffusion noise states: noisy latents of a pretrained LDM tokenizer at an intermediate flow time
(paper Sec. 4, Category 1; Table 1 "Difftraj").

Latents `z` of the training images come from `ctx.baseline_encoder` (`prior.ldm_source=
"baseline_vae"`: the study's own beta-VAE baseline, which the pipeline passes in) or from the staged
Stable Diffusion VAE (`"staged"`: weights `sd_vae_ft_ema`, needs `diffusers`). Then, in order:
reduce z per token if it has more than `reduced_dim` channels (Sec. 3.2), standardise it (overall
mean 0, std 1), and noise it to `t = prior.noise_t` on the repo's flow path (t=0 noise, t=1 data):
`x_t = t * z + (1 - t) * eps`, `eps ~ N(0, I)` from a seeded stream. The set is standardised again.
"""

from __future__ import annotations

from typing import Callable

import torch

from dmvae_study.reference import ReferenceSet
from priors.extract import extract, training_items
from priors.reduce import reduce_chunks
from priors.registry import BuildContext, register


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


@register("ldm_noise", kind="data", order=40)
def build(ctx: BuildContext) -> ReferenceSet:
    """LDM latents of the training images, standardised and noised to flow time prior.noise_t."""
    cfg = ctx.cfg
    if cfg.prior.ldm_source == "staged":
        encoder, source = staged_ldm_encoder(ctx)
    elif ctx.baseline_encoder is None:
        raise ValueError("ldm_noise with prior.ldm_source=baseline_vae needs BuildContext.baseline_encoder "
                         "(images -> latents of the study's beta-VAE); the reference stage passes it")
    else:
        base = ctx.baseline_encoder

        def encoder(img: torch.Tensor) -> torch.Tensor:
            out = base(img.to(ctx.device))
            return out[0] if isinstance(out, (tuple, list)) else out
        source = "baseline_vae"
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
