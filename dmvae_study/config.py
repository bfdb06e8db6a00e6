"""One typed config section per stage, the experiment that groups them, and the named presets.

`ExperimentConfig` is the whole recipe of one study row; `PRESETS` maps a name to a builder and
feeds the CLI choices (`--preset`). Overrides use dotted keys: `--set dmd.dm_weight=20`.
"""

from __future__ import annotations

from typing import Literal

from dataclasses import dataclass

from dmvae_study.configlib import ConfigError, Section, apply_overrides, field

DIT_SIZES = ("tiny", "Mini", "S", "B", "L", "XL")


@dataclass
class DataConfig(Section):
    dataset: Literal["fmnist", "folder", "synthetic"] = field("fmnist", doc="dataset kind")
    root: str | None = field(None, doc="dataset folder; None = the dataset's default location")
    resolution: int = field(32, doc="image side in pixels after resize / crop / pad")
    channels: int = field(3, doc="image channels fed to the tokenizer (grey images are repeated)")
    hflip: bool = field(True, doc="random horizontal flip in training")
    num_classes: int = field(10, doc="number of classes (labels condition the score nets)")
    train_limit: int | None = field(None, doc="use only the first N training images (deterministic)")
    val_limit: int | None = field(None, doc="use only the first N validation images")
    num_workers: int = field(0, doc="DataLoader worker processes per training worker")

    def validate(self) -> None:
        self.check(self.resolution >= 8, "resolution", "must be at least 8")
        self.check(self.channels in (1, 3), "channels", "must be 1 or 3")
        self.check(self.num_classes >= 1, "num_classes", "must be positive")


@dataclass
class TokenizerConfig(Section):
    kind: Literal["ae", "beta_vae", "vavae"] = field("ae", doc="deterministic AE (DMVAE), beta-VAE or VA-VAE baseline")
    backbone: str = field("small_conv", doc="encoder backbone: small_conv or a dmvae_study.backbones name")
    freeze_backbone: bool = field(True, doc="freeze the backbone in pretraining (App. A.1)")
    backbone_patch: int | None = field(None, doc="ViT patch size override (the paper: 16 for DINOv2-L/14 at 256 px)")
    encoder_stride: int = field(8, doc="pixels per latent cell for the small conv encoder")
    encoder_width: int = field(32, doc="channels of the small conv encoder")
    latent_channels: int = field(32, doc="latent channels C of the (B, C, h, w) code")
    projector_hidden: int = field(2048, doc="hidden width of the MLP projector (1024 -> 2048 -> 32)")
    decoder_ch: int = field(128, doc="decoder base channels")
    decoder_ch_mult: tuple[int, ...] = field((1, 2, 4, 4), doc="decoder channel multipliers per resolution")
    decoder_in_upsample: bool = field(False, doc="upsample the latent once before the decoder levels (Flux-style x16)")
    decoder_res_blocks: int = field(2, doc="residual blocks per decoder resolution")
    decoder_attention: bool = field(True, doc="self-attention in the decoder's middle block")
    kl_weight: float = field(1e-6, doc="beta of the beta-VAE baseline (LDM uses 1e-6)")
    vavae_weight: float = field(0.1, doc="hyper weight of the VA-VAE alignment loss")
    vavae_backbone: str = field("dinov2_vitl14", doc="feature backbone VA-VAE aligns to")
    lpips_weight: float = field(1.0, doc="LPIPS weight in the reconstruction loss (0 disables)")
    lpips_net: Literal["vgg", "alex"] = field("vgg", doc="LPIPS backbone")
    disc_weight: float = field(0.5, doc="adversarial weight lambda (App. A.1)")
    disc_start: int = field(5000, doc="step at which the PatchGAN loss switches on")
    disc_layers: int = field(3, doc="PatchGAN depth")
    diffaug: bool = field(True, doc="DiffAugment the discriminator inputs")
    lr: float = field(1e-4, doc="AdamW learning rate")
    batch_size: int = field(256, doc="global batch size (split over workers)")
    total_steps: int = field(40_000, doc="pretraining steps (App. A.1: 40k)")
    ema_decay: float = field(0.999, doc="EMA decay of the trainable parameters")

    def validate(self) -> None:
        self.check(self.latent_channels > 0, "latent_channels", "must be positive")
        self.check(self.lpips_weight >= 0, "lpips_weight", "must be >= 0")
        self.check(self.total_steps >= 0, "total_steps", "must be >= 0")
        self.check(self.batch_size > 0, "batch_size", "must be positive")


@dataclass
class PriorConfig(Section):
    name: str = field("dinov2", doc="reference distribution (a `priors` registry name, or vae / vavae rows)")
    backbone: str | None = field(None, doc="feature backbone override for data-derived priors")
    reducer: Literal["bottleneck", "pca", "none"] = field("bottleneck", doc="reduction to reduced_dim (Sec. 3.2)")
    reduced_dim: int = field(32, doc="channels of the reduced reference set")
    reducer_steps: int = field(2000, doc="training steps of the bottleneck reducer")
    num_samples: int | None = field(None, doc="reference samples to build (None: one per training image)")
    noise_t: float = field(0.5, doc="ldm_noise: flow time of the noised LDM latents (0 noise, 1 data)")
    ldm_source: Literal["baseline_vae", "staged"] = field("baseline_vae", doc="ldm_noise: which LDM tokenizer")
    classes: tuple[int, ...] | None = field(None, doc="sub_dino: class ids kept (None: the documented default)")
    gmm_components: int = field(10, doc="gmm: number of mixture components")
    text_encoder: str = field("siglip", doc="siglip_text: siglip, minilm, or a local Hugging Face dir")
    captions: str | None = field(None, doc="siglip_text: JSONL file of {id, caption}; None: class templates")
    dm_weight: float | None = field(None, doc="DM weight for this prior; None: 10 data-derived, 1 synthetic (Sec. 4)")
    batch_size: int = field(64, doc="feature-extraction batch")
    shard_size: int = field(4096, doc="samples per reference shard (resume granularity)")

    def validate(self) -> None:
        self.check(0.0 <= self.noise_t <= 1.0, "noise_t", "must lie in [0, 1]")
        self.check(self.reduced_dim > 0, "reduced_dim", "must be positive")


@dataclass
class TeacherConfig(Section):
    size: str = field("L", doc=f"LightningDiT size of the real and fake score nets: {', '.join(DIT_SIZES)}")
    patch_size: int = field(1, doc="DiT patch size")
    lr: float = field(2e-4, doc="AdamW learning rate (VA-VAE recipe)")
    batch_size: int = field(1024, doc="global batch size")
    total_steps: int = field(500_000, doc="training steps")
    class_dropout: float = field(0.1, doc="label dropout for classifier-free guidance")
    ema_decay: float = field(0.9999, doc="EMA decay")
    time_sampling: Literal["uniform", "logit_normal"] = field("logit_normal", doc="flow-matching time law")
    grad_checkpointing: bool = field(False, doc="trade compute for memory in the DiT blocks")

    def validate(self) -> None:
        self.check(self.size in DIT_SIZES, "size", f"must be one of {', '.join(DIT_SIZES)}")
        self.check(0.0 <= self.class_dropout < 1.0, "class_dropout", "must lie in [0, 1)")


@dataclass
class DMDConfig(Section):
    dm_weight: float = field(10.0, doc="weight of the DM loss (Eq. 6; Table 2 default 10)")
    cfg_scale: float = field(1.0, doc="CFG scale on both scores in Eq. 9 (1 = off)")
    timestep_schedule: Literal["uniform", "anneal"] = field("uniform", doc="t range: fixed, or [0,1] -> [0,0.5]")
    t_min: float = field(0.0, doc="lower end of the DM time range")
    t_max: float = field(1.0, doc="upper end of the DM time range (start of annealing)")
    t_max_end: float = field(0.5, doc="upper end at the end of annealing (Table 2: 0.5)")
    vae_every: int = field(5, doc="update the VAE once every k steps; the fake net every step (App. A.3)")
    head: Literal["auto", "none", "mlp", "query"] = field("auto", doc="projection head to the reference shape")
    head_hidden: int = field(256, doc="projection-head width")
    lr: float = field(1e-5, doc="learning rate of the VAE (App. A.3)")
    fake_lr: float = field(1e-5, doc="learning rate of the fake score net")
    batch_size: int = field(256, doc="global batch size")
    total_steps: int = field(300_000, doc="joint training steps (Sec. 4: 300k)")
    gan: bool = field(True, doc="keep the GAN term in the reconstruction loss on VAE turns")

    def validate(self) -> None:
        self.check(self.vae_every >= 1, "vae_every", "must be >= 1")
        self.check(self.cfg_scale >= 1.0, "cfg_scale", "must be >= 1 (1 = no guidance)")
        self.check(0.0 <= self.t_min < self.t_max <= 1.0, "t_max", "need 0 <= t_min < t_max <= 1")
        self.check(self.t_min < self.t_max_end <= self.t_max, "t_max_end", "need t_min < t_max_end <= t_max")


@dataclass
class RefineConfig(Section):
    total_steps: int = field(10_000, doc="decoder fine-tuning steps with the encoder frozen (App. A.4)")
    lr: float = field(1e-4, doc="learning rate")
    batch_size: int = field(256, doc="global batch size")


@dataclass
class GeneratorConfig(Section):
    size: str = field("L", doc="stage-2 LightningDiT size")
    patch_size: int = field(1, doc="DiT patch size")
    lr: float = field(2e-4, doc="AdamW learning rate")
    batch_size: int = field(256, doc="global batch size")
    total_steps: int = field(300_000, doc="training steps (Table 1: DiT-L 300k at batch 256)")
    class_dropout: float = field(0.1, doc="label dropout for CFG")
    ema_decay: float = field(0.9999, doc="EMA decay")
    time_sampling: Literal["uniform", "logit_normal"] = field("logit_normal", doc="flow-matching time law")
    flip_cache: bool = field(True, doc="cache latents of horizontally flipped images too")
    eval_every: int = field(0, doc="gFID every N steps for the curve of Fig. 8 (0: only at the end)")
    grad_checkpointing: bool = field(False, doc="trade compute for memory")

    def validate(self) -> None:
        self.check(self.size in DIT_SIZES, "size", f"must be one of {', '.join(DIT_SIZES)}")


@dataclass
class EvalConfig(Section):
    gfid_samples: int = field(5000, doc="samples for gFID (5000 = the paper's gFID-5k)")
    rfid_images: int = field(50_000, doc="validation images reconstructed for rFID and PSNR")
    sampler: Literal["sde", "ode_euler", "ode_heun"] = field("sde", doc="stage-2 sampler")
    sampler_steps: int = field(250, doc="sampling steps (paper: 250)")
    cfg_scale: float = field(1.0, doc="CFG at sampling (paper: none)")
    extractor: Literal["inception", "lite0"] = field("inception", doc="FID feature extractor")
    batch_size: int = field(250, doc="sampling / feature batch")
    grid_images: int = field(64, doc="images in the saved sample and reconstruction grids")


@dataclass
class RunConfig(Section):
    name: str = field("table1", doc="study name: results go to <out_dir>/<name>")
    out_dir: str = field("results", doc="results root")
    store_dir: str | None = field(None, doc="artifact store root (None: <out_dir>/<name>/store)")
    weights_dir: str | None = field(None, doc="pretrained weights dir (None: $DMVAE_WEIGHTS_DIR or ~/.cache)")
    allow_random_weights: bool = field(False, doc="run backbones random-init when weights are missing (labelled)")
    seed: int = field(0, doc="global seed")
    ema_warmup: bool = field(True, doc="EMA decay min(decay, (1+n)/(10+n)) over the first updates; False: plain EMA")
    num_workers: int = field(1, doc="Ray Train workers per stage")
    use_gpu: bool = field(False, doc="one GPU per Ray Train worker")
    cpus_per_worker: float = field(0.9, doc="CPU reserved per Ray Train worker")
    max_concurrent_trials: int = field(0, doc="Tune concurrency (0: derived from the cluster)")
    max_failures: int = field(2, doc="restarts of a stage after a worker loss (Ray FailureConfig)")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", doc="bf16 autocast on GPU under auto")
    compile: bool = field(False, doc="torch.compile the DiT")
    checkpoint_every: int = field(1000, doc="checkpoint every N steps of a stage")
    log_every: int = field(50, doc="reduce and report metrics every N steps")
    max_nonfinite: int = field(20, doc="consecutive non-finite losses before a stage stops")
    fail_at_step: int | None = field(None, doc="fault injection (tests): a worker exits at this step, first attempt")

    def validate(self) -> None:
        self.check(self.num_workers >= 1, "num_workers", "must be >= 1")
        self.check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")


@dataclass
class ExperimentConfig(Section):
    data: DataConfig = field(factory=DataConfig, doc="dataset")
    tokenizer: TokenizerConfig = field(factory=TokenizerConfig, doc="tokenizer pretraining (App. A.1)")
    prior: PriorConfig = field(factory=PriorConfig, doc="reference distribution (Sec. 4)")
    teacher: TeacherConfig = field(factory=TeacherConfig, doc="reference score model (App. A.2)")
    dmd: DMDConfig = field(factory=DMDConfig, doc="joint DMD training (Sec. 3.1, App. A.3)")
    refine: RefineConfig = field(factory=RefineConfig, doc="decoder refinement (App. A.4)")
    generator: GeneratorConfig = field(factory=GeneratorConfig, doc="stage-2 DiT (App. A.5)")
    eval: EvalConfig = field(factory=EvalConfig, doc="metrics")
    run: RunConfig = field(factory=RunConfig, doc="execution")

    def validate(self) -> None:
        for section, bs in (("tokenizer", self.tokenizer.batch_size), ("teacher", self.teacher.batch_size),
                            ("dmd", self.dmd.batch_size), ("refine", self.refine.batch_size),
                            ("generator", self.generator.batch_size)):
            if bs % self.run.num_workers:
                raise ConfigError(f"{section}.batch_size={bs} is not divisible by run.num_workers="
                                  f"{self.run.num_workers}; pick a batch size that is a multiple of the workers")


# ---------------------------------------------------------------------------------------------
# Presets: one dict, feeding the CLI choices and the docs.

def _smoke() -> ExperimentConfig:
    """Whole pipeline in minutes on 2 CPU cores: Fashion-MNIST at 32 px, tiny nets, random backbones."""
    return ExperimentConfig.from_dict({
        "data": {"dataset": "fmnist", "resolution": 32, "channels": 3, "train_limit": 512, "val_limit": 128},
        "tokenizer": {"backbone": "small_conv", "encoder_stride": 8, "encoder_width": 16, "latent_channels": 4,
                      "projector_hidden": 32, "decoder_ch": 16, "decoder_ch_mult": [1, 2, 2, 2],
                      "decoder_res_blocks": 1, "decoder_attention": False, "lpips_weight": 0.0,
                      "vavae_backbone": "dinov2_vits14", "disc_start": 20, "disc_layers": 2, "lr": 2e-3, "batch_size": 32, "total_steps": 40},
        "prior": {"backbone": "dinov2_vits14", "reducer": "pca", "reduced_dim": 4, "reducer_steps": 50,
                  "num_samples": 256, "text_encoder": "minilm", "batch_size": 64, "shard_size": 128},
        "teacher": {"size": "tiny", "lr": 1e-3, "batch_size": 64, "total_steps": 60, "ema_decay": 0.9},
        "dmd": {"lr": 1e-3, "fake_lr": 1e-3, "batch_size": 32, "total_steps": 30, "head_hidden": 32},
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
    return ExperimentConfig.from_dict({
        "data": {"dataset": "fmnist", "resolution": 32, "channels": 3, "val_limit": 2000},
        "tokenizer": {"backbone": "small_conv", "encoder_stride": 4, "encoder_width": 32, "latent_channels": 8,
                      "projector_hidden": 128, "decoder_ch": 32, "decoder_ch_mult": [1, 2, 2],
                      "decoder_res_blocks": 1, "decoder_attention": True, "lpips_weight": 0.0,
                      "vavae_backbone": "efficientnet_lite0", "disc_start": 2000, "lr": 5e-4, "batch_size": 64,
                      "total_steps": 4000},
        "prior": {"reducer": "bottleneck", "reduced_dim": 8, "reducer_steps": 1000, "num_samples": 10000,
                  "text_encoder": "minilm", "shard_size": 2048},
        "teacher": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 4000, "ema_decay": 0.999},
        "dmd": {"lr": 1e-4, "fake_lr": 1e-4, "batch_size": 64, "total_steps": 3000, "head_hidden": 128},
        "refine": {"total_steps": 500, "lr": 1e-4, "batch_size": 64},
        "generator": {"size": "tiny", "lr": 1e-3, "batch_size": 128, "total_steps": 8000, "ema_decay": 0.999,
                      "eval_every": 2000},
        "eval": {"gfid_samples": 2000, "rfid_images": 2000, "sampler_steps": 50, "extractor": "lite0",
                 "batch_size": 100},
        "run": {"name": "fmnist", "checkpoint_every": 500, "log_every": 100},
    })


def _imagenet256() -> ExperimentConfig:
    """The paper's Table 1 setting (Sec. 4, App. A): 256 px, DINOv2-L/16 encoder, 16x16x32 latents,
    LightningDiT-L score nets, 300k DMD iterations at batch 256, stage-2 DiT-L 300k at batch 256."""
    return ExperimentConfig.from_dict({
        "data": {"dataset": "folder", "root": "data/ImageNet", "resolution": 256, "num_classes": 1000,
                 "num_workers": 8},
        "tokenizer": {"backbone": "dinov2_vitl14", "backbone_patch": 16, "latent_channels": 32,
                      "projector_hidden": 2048, "decoder_ch": 128, "decoder_ch_mult": [1, 2, 4, 4],
                      "decoder_in_upsample": True,
                      "decoder_res_blocks": 2, "disc_start": 5000, "batch_size": 256, "total_steps": 40000},
        "prior": {"backbone": "dinov2_vitl14", "reducer": "bottleneck", "reduced_dim": 32,
                  "reducer_steps": 20000, "batch_size": 256, "shard_size": 16384},
        "teacher": {"size": "L", "batch_size": 1024, "total_steps": 500_000},
        "dmd": {"batch_size": 256, "total_steps": 300_000},
        "refine": {"total_steps": 10_000, "batch_size": 256},
        "generator": {"size": "L", "batch_size": 256, "total_steps": 300_000, "eval_every": 50_000},
        "eval": {"gfid_samples": 5000, "rfid_images": 50_000, "extractor": "inception"},
        "run": {"name": "imagenet256", "num_workers": 8, "use_gpu": True, "cpus_per_worker": 8.0,
                "precision": "auto", "checkpoint_every": 5000},
    })


PRESETS = {"smoke": _smoke, "fmnist": _fmnist, "imagenet256": _imagenet256}


def preset(name: str, overrides: list[str] | dict | None = None) -> ExperimentConfig:
    """The named preset with dotted overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg
