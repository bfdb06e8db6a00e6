"""The named presets: one builder each, feeding the CLI choices (`--preset`) and the docs.

A small preset is the paper's recipe shrunk; each value that differs from the paper / official default
says why. `preset(name, overrides)` applies dotted overrides (`--set dmd.dm_weight=20`) on top.
"""

from __future__ import annotations

from dmvae_study.config import ExperimentConfig
from dmvae_study.configlib import ConfigError, apply_overrides



def _smoke() -> ExperimentConfig:
    """Whole pipeline in minutes on 2 CPU cores: Fashion-MNIST at 32 px, tiny nets, random backbones."""
    small_tok = {"backbone": "small_conv", "encoder_stride": 8, "encoder_width": 16, "latent_channels": 4,
                 "projector_hidden": 32, "decoder_ch": 16, "decoder_ch_mult": [1, 2, 2, 2],
                 "decoder_res_blocks": 1, "decoder_attention": False, "lpips_weight": 0.0,
                 "vavae_backbone": "dinov2_vits14", "disc_start": 20, "disc_layers": 2, "lr": 2e-3,
                 "batch_size": 32, "total_steps": 40}
    return ExperimentConfig.from_dict({
        "data": {"dataset": "fmnist", "resolution": 32, "channels": 3, "train_limit": 512, "val_limit": 128},
        "tokenizer": small_tok,
        "baseline": small_tok,
        "prior": {"backbone": "dinov2_vits14", "reduced_dim": 4, "reducer_steps": 50,
                  "num_samples": 256, "text_encoder": "minilm", "batch_size": 64, "shard_size": 128},
        "teacher": {"size": "tiny", "lr": 1e-3, "batch_size": 64, "total_steps": 60, "ema_decay": 0.9},
        # tens of steps: a large lr, no warmup, the GAN term from the start (its discriminator is the
        # tokenizer stage's, already trained)
        "dmd": {"lr": 1e-3, "fake_lr": 1e-3, "disc_lr": 1e-3, "batch_size": 32, "total_steps": 30,
                "head_hidden": 32, "warmup_steps": 0, "gan_start": 0},
        "refine": {"total_steps": 10, "lr": 1e-3, "batch_size": 32},
        "generator": {"size": "tiny", "lr": 1e-3, "batch_size": 64, "total_steps": 60, "ema_decay": 0.9,
                      "eval_every": 30},
        "eval": {"gfid_samples": 64, "rfid_images": 64, "sampler_steps": 20, "extractor": "lite0",
                 "batch_size": 64, "grid_images": 16},
        "run": {"name": "smoke", "allow_random_weights": True, "checkpoint_every": 20, "log_every": 10},
    })


def _fmnist() -> ExperimentConfig:
    """A real small study: all of Fashion-MNIST at 32 px, 8x8x8 latents, tiny score nets and real
    offline features (EfficientNet-Lite0, MiniLM); about 2.5-3 hours for two rows side by side on
    2 CPU cores (estimated from the step rates of a measured shortened run, README)."""
    conv_tok = {"backbone": "small_conv", "encoder_stride": 4, "encoder_width": 32, "latent_channels": 8,
                "projector_hidden": 128, "decoder_ch": 32, "decoder_ch_mult": [1, 2, 2],
                "decoder_res_blocks": 1, "decoder_attention": True, "lpips_weight": 0.0,
                "vavae_backbone": "efficientnet_lite0", "disc_start": 2000, "lr": 5e-4, "batch_size": 64,
                "total_steps": 4000}
    return ExperimentConfig.from_dict({
        "data": {"dataset": "fmnist", "resolution": 32, "channels": 3, "val_limit": 2000},
        "tokenizer": conv_tok,
        "baseline": conv_tok,
        "prior": {"reduced_dim": 8, "reducer_steps": 1000, "num_samples": 10000,
                  "text_encoder": "minilm", "shard_size": 2048},
        "teacher": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 4000, "ema_decay": 0.999},
        # 3k steps instead of 300k: a 10x larger lr and a warmup shortened in proportion
        "dmd": {"lr": 1e-4, "fake_lr": 1e-4, "disc_lr": 1e-4, "batch_size": 64, "total_steps": 3000,
                "head_hidden": 128, "warmup_steps": 100, "gan_start": 0},
        "refine": {"total_steps": 500, "lr": 1e-4, "batch_size": 64},
        "generator": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 8000, "ema_decay": 0.999,
                      "eval_every": 2000},
        "eval": {"gfid_samples": 2000, "gfid_ref_images": 10000, "rfid_images": 2000, "sampler_steps": 50,
                 "extractor": "lite0", "batch_size": 100},
        "run": {"name": "fmnist", "checkpoint_every": 500, "log_every": 100},
    })


def _mini() -> ExperimentConfig:
    """The paper's recipe in small, with real offline weights only (README "The miniature study"):
    Fashion-MNIST at 32 px; the DMVAE tokenizer is a *frozen ImageNet-pretrained* EfficientNet-Lite0
    (block 10: 112 channels at stride 16, run at 128 px so its map is the 8x8 latent grid) with an MLP
    projector and a conv decoder (App. A.1, Lite0 in DINOv2's place); the semantic prior's reference is
    that tokenizer's latents (A.2); DMD trains the whole encoder (A.3). Baselines are conv autoencoders
    (beta-VAE; VA-VAE aligned to the same Lite0 features). Tiny LightningDiTs score and generate."""
    conv = {"backbone": "small_conv", "encoder_stride": 4, "encoder_width": 32, "latent_channels": 8,
            "projector_hidden": 128, "decoder_ch": 32, "decoder_ch_mult": [1, 2, 2], "decoder_res_blocks": 1,
            "decoder_attention": False, "lpips_weight": 0.0, "disc_start": 600, "disc_layers": 2, "lr": 5e-4,
            "batch_size": 64, "total_steps": 1200, "vavae_backbone": "efficientnet_lite0", "vavae_layer": "block10"}
    return ExperimentConfig.from_dict({
        "data": {"dataset": "fmnist", "resolution": 32, "channels": 3, "train_limit": 20000, "val_limit": 1000},
        "tokenizer": {**conv, "backbone": "efficientnet_lite0", "backbone_layer": "block10", "projector_hidden": 256},
        "baseline": conv,
        "prior": {"backbone": "efficientnet_lite0", "reduced_dim": 8, "reducer_steps": 300, "num_samples": 10000,
                  "text_encoder": "minilm", "shard_size": 4096, "ldm_source": "baseline_vae"},
        "teacher": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 1200, "ema_decay": 0.999},
        # 600 DMD steps instead of 300k: a 5x larger lr and a warmup shortened in proportion (30 updates)
        "dmd": {"lr": 1e-4, "fake_lr": 1e-4, "disc_lr": 1e-4, "batch_size": 64, "total_steps": 600,
                "head_hidden": 128, "warmup_steps": 30, "gan_start": 0},
        "refine": {"total_steps": 100, "lr": 1e-4, "batch_size": 64},
        "generator": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 2500, "ema_decay": 0.999,
                      "eval_every": 500, "curve_samples": 500},
        "eval": {"gfid_samples": 1000, "gfid_ref_images": 10000, "rfid_images": 1000, "sampler_steps": 50,
                 "extractor": "lite0", "batch_size": 100},
        "run": {"name": "mini", "checkpoint_every": 500, "log_every": 100},
    })


def _imagenet256() -> ExperimentConfig:
    """The paper's Table 1 setting (Sec. 4, App. A): 256 px, DINOv2-L/16 encoder, 16x16x32 latents,
    LightningDiT-L score nets, 300k DMD iterations at batch 256 with the official optimiser, stage-2
    DiT-L 300k at batch 256; baselines are the VA-VAE repository's f16d32 conv autoencoder recipe."""
    return ExperimentConfig.from_dict({
        "data": {"dataset": "folder", "root": "data/ImageNet", "resolution": 256, "num_classes": 1000,
                 "num_workers": 8},
        "tokenizer": {"backbone": "dinov2_vitl14", "backbone_patch": 16, "encoder_stride": 16, "latent_channels": 32,
                      "projector_hidden": 2048, "decoder_ch": 128, "decoder_ch_mult": [1, 2, 4, 4],
                      "decoder_in_upsample": True,
                      "decoder_res_blocks": 2, "disc_start": 5000, "batch_size": 256, "total_steps": 40000},
        # hustvl/LightningDiT vavae/configs/f16d32_{ldm,vfdinov2}.yaml: ch 128, ch_mult (1,1,2,2,4), 2 res
        # blocks, z 32, kl 1e-6, disc_start 5001, disc_weight 0.5, base lr 1e-4, 8 x 32 GPUs = batch 256,
        # 50 epochs (~250k steps); VF loss: weight 0.1 adaptive, margins 0.5 / 0.25, DINOv2-L.
        "baseline": {"backbone": "ldm_conv", "encoder_stride": 16, "encoder_width": 128,
                     "encoder_ch_mult": [1, 1, 2, 2, 4], "latent_channels": 32, "projector_hidden": 512,
                     "decoder_ch": 128, "decoder_ch_mult": [1, 1, 2, 2, 4], "decoder_res_blocks": 2,
                     "kl_weight": 1e-6, "vavae_weight": 0.1, "vavae_backbone": "dinov2_vitl14", "disc_start": 5001,
                     "lr": 1e-4, "batch_size": 256, "total_steps": 250_000},
        "prior": {"backbone": "dinov2_vitl14", "reduced_dim": 32,
                  "reducer_steps": 20000, "batch_size": 256, "shard_size": 16384, "ldm_source": "staged"},
        "teacher": {"size": "L", "batch_size": 1024, "total_steps": 500_000},
        "dmd": {"batch_size": 256, "total_steps": 300_000},  # the official optimiser values are the defaults
        "refine": {"total_steps": 10_000, "batch_size": 256},
        "generator": {"size": "L", "batch_size": 256, "total_steps": 300_000, "eval_every": 50_000},
        "eval": {"gfid_samples": 5000, "gfid_ref_images": 50_000, "rfid_images": 50_000, "extractor": "inception"},
        "run": {"name": "imagenet256", "num_workers": 8, "use_gpu": True, "cpus_per_worker": 8.0,
                "precision": "auto", "checkpoint_every": 5000, "require_shared_storage": True},
    })


PRESETS = {"smoke": _smoke, "fmnist": _fmnist, "mini": _mini, "imagenet256": _imagenet256}


def preset(name: str, overrides: list[str] | dict | None = None) -> ExperimentConfig:
    """The named preset with dotted overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg
