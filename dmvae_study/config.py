"""One typed config section per stage and the experiment that groups them (the named presets are in
`dmvae_study.presets`).

`ExperimentConfig` is the whole recipe of one study row. Overrides use dotted keys: `--set dmd.dm_weight=20`. Every field
declares its rule (`rule=`), checked on construction; cross-field rules live in `validate()`.
Fields that a study derives per row (`dmd.dm_weight`, `prior.ldm_source=auto`) default to "derive"
and are filled once by `dmvae_study.pipeline.resolve`, never over a value the user set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dmvae_study.configlib import NONNEG, POSITIVE, UNIT, UNIT_OPEN_HI, ConfigError, Section, each, field, ge, one_of
from dmvae_study.models.sizes import LIGHTNINGDIT_PRESETS

DIT_SIZES = tuple(LIGHTNINGDIT_PRESETS)
BETAS = each(UNIT_OPEN_HI)
DROP_PATH_BACKBONES = ("efficientnet_lite0",)  # backbones whose stochastic depth dmd.encoder_drop_path sets
OFFICIAL_BETAS = (0.9, 0.95)  # AdamW betas of every official DMVAE / LightningDiT optimiser


@dataclass
class DataConfig(Section):
    dataset: Literal["fmnist", "folder", "synthetic"] = field("fmnist", doc="dataset kind")
    root: str | None = field(None, doc="dataset folder; None = the dataset's default location")
    resolution: int = field(32, doc="image side in pixels after resize / crop / pad", rule=ge(8), example=32)
    channels: int = field(3, doc="image channels fed to the tokenizer (grey images are repeated)", rule=one_of(1, 3))
    hflip: bool = field(True, doc="random horizontal flip in training (a new draw every epoch)")
    num_classes: int = field(10, doc="number of classes (labels condition the score nets)", rule=POSITIVE)
    train_limit: int | None = field(None, doc="use only the first N training images (deterministic)",
                                    rule=POSITIVE, example=512)
    val_limit: int | None = field(None, doc="use only the first N validation images", rule=POSITIVE, example=128)
    num_workers: int = field(0, doc="DataLoader worker processes per training worker", rule=NONNEG)


@dataclass
class TokenizerConfig(Section):
    """The DMVAE tokenizer (`tokenizer`: frozen backbone + MLP projector, App. A.1) or the baselines'
    (`baseline`: the beta-VAE / VA-VAE conv autoencoder). Which kind a row trains follows its row."""

    backbone: str = field("small_conv", doc="encoder: small_conv, ldm_conv (LDM/VA-VAE f16 conv encoder) or a "
                          "dmvae_study.backbones name (frozen pretrained features)")
    freeze_backbone: bool = field(True, doc="freeze a pretrained backbone in pretraining (App. A.1)")
    backbone_patch: int | None = field(None, doc="ViT patch size override (the paper: 16 for DINOv2-L/14 at 256 px)",
                                       rule=POSITIVE, example=16)
    backbone_layer: str | None = field(None, doc="backbone feature layer (resnet34: layer3 | layer4; "
                                       "efficientnet_lite0: head | block<k>); None = the last one")
    encoder_stride: int = field(8, doc="pixels per latent cell: the latent grid is resolution / stride",
                                rule=one_of(1, 2, 4, 8, 16, 32, 64))
    encoder_width: int = field(32, doc="base channels of the conv encoders (small_conv, ldm_conv)", rule=POSITIVE)
    encoder_ch_mult: tuple[int, ...] = field((1, 1, 2, 2, 4), doc="ldm_conv channel multipliers per level "
                                             "(VA-VAE f16d32: 1,1,2,2,4)", rule=each(POSITIVE))
    latent_channels: int = field(32, doc="latent channels C of the (B, C, h, w) code", rule=POSITIVE)
    projector_hidden: int = field(2048, doc="hidden width of the MLP projector (1024 -> 2048 -> 32)", rule=POSITIVE)
    decoder_ch: int = field(128, doc="decoder base channels", rule=POSITIVE)
    decoder_ch_mult: tuple[int, ...] = field((1, 2, 4, 4), doc="decoder channel multipliers per resolution",
                                             rule=each(POSITIVE))
    decoder_in_upsample: bool = field(False, doc="upsample the latent once before the decoder levels (Flux-style x16)")
    decoder_res_blocks: int = field(2, doc="residual blocks per decoder resolution", rule=POSITIVE)
    decoder_attention: bool = field(True, doc="self-attention in the decoder's middle block")
    kl_weight: float = field(1e-6, doc="beta of the beta-VAE baseline (LDM / VA-VAE f16d32: 1e-6)", rule=NONNEG)
    vavae_weight: float = field(0.1, doc="VA-VAE alignment weight (adaptive, VA-VAE f16d32: 0.1)", rule=NONNEG)
    vavae_backbone: str = field("dinov2_vitl14", doc="feature backbone VA-VAE aligns to")
    vavae_layer: str | None = field(None, doc="layer of the VA-VAE alignment backbone (as backbone_layer)")
    vavae_cos_margin: float = field(0.5, doc="VA-VAE marginal cosine margin m1 (VA-VAE: 0.5)", rule=UNIT)
    vavae_distmat_margin: float = field(0.25, doc="VA-VAE distance-matrix margin m2 (VA-VAE: 0.25)", rule=UNIT)
    lpips_weight: float = field(1.0, doc="LPIPS weight in the reconstruction loss (0 disables)", rule=NONNEG)
    lpips_net: Literal["vgg", "alex"] = field("vgg", doc="LPIPS backbone")
    disc_weight: float = field(0.5, doc="adversarial weight lambda (App. A.1)", rule=NONNEG)
    disc_start: int | None = field(5000, doc="step at which the PatchGAN loss switches on (None: never)",
                                   rule=NONNEG, example=5000)
    disc_layers: int = field(3, doc="PatchGAN depth", rule=POSITIVE)
    diffaug: bool = field(True, doc="DiffAugment the discriminator inputs")
    lr: float = field(1e-4, doc="AdamW learning rate (tokenizer and discriminator)", rule=POSITIVE, example=1e-4)
    betas: tuple[float, float] = field(OFFICIAL_BETAS, doc="AdamW betas", rule=BETAS)
    weight_decay: float = field(0.0, doc="AdamW weight decay", rule=NONNEG)
    grad_clip: float = field(0.0, doc="gradient-norm clip of tokenizer and discriminator (0: off)", rule=NONNEG)
    warmup_steps: int = field(0, doc="linear learning-rate warmup steps", rule=NONNEG)
    batch_size: int = field(256, doc="global batch size (split over workers)", rule=POSITIVE, example=256)
    total_steps: int = field(40_000, doc="pretraining steps (App. A.1: 40k)", rule=NONNEG)
    ema_decay: float = field(0.999, doc="EMA decay of the trainable parameters", rule=UNIT_OPEN_HI)

    def validate(self) -> None:
        self.check(len(self.decoder_ch_mult) >= 1, "decoder_ch_mult", "needs at least one level", (1, 2, 2))
        if self.backbone == "ldm_conv":
            self.check(2 ** (len(self.encoder_ch_mult) - 1) == self.encoder_stride, "encoder_ch_mult",
                       f"ldm_conv downsamples x2 per level after the first: {len(self.encoder_ch_mult)} levels give "
                       f"stride {2 ** (len(self.encoder_ch_mult) - 1)}, not encoder_stride={self.encoder_stride}",
                       (1,) * (self.encoder_stride.bit_length()))


@dataclass
class PriorConfig(Section):
    name: str = field("dinov2", doc="row: a `priors` registry name (DMVAE with that reference), or vae / vavae")
    backbone: str | None = field(None, doc="feature backbone override for data-derived priors")
    reduction: Literal["tokenizer", "feature_ae", "pca", "none"] | None = field(
        None, doc="how features become the reference (Sec. 3.2): latents of a frozen-backbone tokenizer (App. A.2), "
        "a bottleneck feature autoencoder, PCA, or kept; None: the prior's own default (priors registry)")
    reduced_dim: int = field(32, doc="channels of the reduced reference set", rule=POSITIVE)
    reducer_steps: int = field(2000, doc="training steps of the feature_ae reducer", rule=NONNEG)
    num_samples: int | None = field(None, doc="reference samples to build (None: one per training image)",
                                    rule=POSITIVE, example=10000)
    tokenizer_flips: bool = field(True, doc="reduction=tokenizer: also encode the flipped training images")
    noise_t: float = field(0.5, doc="ldm_noise: flow time of the noised LDM latents (0 noise, 1 data)", rule=UNIT)
    ldm_source: Literal["auto", "staged", "baseline_vae"] = field(
        "auto", doc="ldm_noise: the staged SD-VAE (diffusers), the study's own beta-VAE, or auto: staged when "
        "its weights are present, else the beta-VAE (labelled)")
    classes: tuple[int, ...] | None = field(None, doc="sub_dino: class ids kept (None: the documented default)",
                                            rule=each(NONNEG), example=[0, 1, 2, 3, 4])
    gmm_components: int = field(10, doc="gmm: number of mixture components", rule=POSITIVE)
    text_encoder: str = field("siglip", doc="siglip_text: siglip, minilm, or a local Hugging Face dir")
    captions: str | None = field(None, doc="siglip_text: JSONL file of {id, caption}; None: class templates")
    batch_size: int = field(64, doc="feature-extraction batch", rule=POSITIVE)
    shard_size: int = field(4096, doc="samples per reference shard (resume granularity)", rule=POSITIVE)


@dataclass
class TeacherConfig(Section):
    size: str = field("L", doc=f"LightningDiT size of the real and fake score nets: {', '.join(DIT_SIZES)}",
                      rule=one_of(*DIT_SIZES))
    patch_size: int = field(1, doc="DiT patch size", rule=POSITIVE)
    lr: float = field(2e-4, doc="AdamW learning rate (VA-VAE recipe)", rule=POSITIVE)
    betas: tuple[float, float] = field(OFFICIAL_BETAS, doc="AdamW betas", rule=BETAS)
    weight_decay: float = field(0.0, doc="AdamW weight decay", rule=NONNEG)
    grad_clip: float = field(1.0, doc="gradient-norm clip (0: off)", rule=NONNEG)
    warmup_steps: int = field(0, doc="linear learning-rate warmup steps", rule=NONNEG)
    batch_size: int = field(1024, doc="global batch size", rule=POSITIVE, example=1024)
    total_steps: int = field(500_000, doc="training steps", rule=NONNEG)
    class_dropout: float = field(0.1, doc="label dropout for classifier-free guidance", rule=UNIT_OPEN_HI)
    ema_decay: float = field(0.9999, doc="EMA decay", rule=UNIT_OPEN_HI)
    time_sampling: Literal["uniform", "logit_normal"] = field(
        "uniform", doc="flow-matching time law (official train_diffusion.py: uniform; the DM loss samples t "
        "uniformly, so the teacher must be accurate on all of [0, 1])")
    grad_checkpointing: bool = field(False, doc="trade compute for memory in the DiT blocks")


@dataclass
class DMDConfig(Section):
    dm_weight: float | None = field(None, doc="weight of the DM loss (Eq. 6); None: by the prior's kind, 10 "
                                    "data-derived / 1 synthetic (Sec. 4)", rule=NONNEG, example=10.0)
    cfg_scale: float = field(1.0, doc="CFG scale on both scores in Eq. 9 (1 = off; Table 2 default)", rule=ge(1.0))
    timestep_schedule: Literal["uniform", "anneal"] = field(
        "uniform", doc="DM times: uniform on [t_min, t_max], or annealed to [t_min_end, t_max] (Sec. 5.1)")
    t_min: float = field(0.0, doc="lower end of the DM time range (t = 0 noise)", rule=UNIT)
    t_max: float = field(1.0, doc="upper end of the DM time range (t = 1 data)", rule=UNIT)
    t_min_end: float = field(0.5, doc="anneal: lower end at the end of training; [0,1] -> [0.5,1] is the paper's "
                             "noise range [0,1] -> [0,0.5] in this platform's time", rule=UNIT)
    vae_every: int = field(5, doc="update the VAE once every k steps; the fake net every step (App. A.3)",
                           rule=POSITIVE)
    head: Literal["auto", "none", "mlp", "query"] = field("auto", doc="projection head to the reference shape")
    head_hidden: int = field(256, doc="projection-head width", rule=POSITIVE)
    lr: float = field(2e-5, doc="learning rate of the VAE (official train_dmd.sh: 2e-5)", rule=POSITIVE)
    fake_lr: float = field(2e-5, doc="learning rate of the fake score net (official: 2e-5)", rule=POSITIVE)
    disc_lr: float = field(2e-5, doc="learning rate of the discriminator (official: 2e-5)", rule=POSITIVE)
    betas: tuple[float, float] = field(OFFICIAL_BETAS, doc="AdamW betas of all three optimisers (official)", rule=BETAS)
    weight_decay: float = field(0.005, doc="AdamW weight decay of VAE and fake net (official: 0.005)", rule=NONNEG)
    disc_weight_decay: float = field(5e-4, doc="AdamW weight decay of the discriminator (official: 5e-4)",
                                     rule=NONNEG)
    grad_clip: float = field(1.0, doc="gradient-norm clip of VAE and discriminator (official: 1.0; 0: off)",
                             rule=NONNEG)
    fake_grad_clip: float = field(1.0, doc="gradient-norm clip of the fake score net (official: 1.0; 0: off)",
                                  rule=NONNEG)
    warmup_steps: int = field(1000, doc="linear LR warmup of each optimiser over its first updates (official: 1000)",
                              rule=NONNEG)
    gan_start: int | None = field(5000, doc="DMD step at which the GAN term switches on (official: 5000; "
                                  "None: no GAN term)", rule=NONNEG, example=5000)
    batch_size: int = field(256, doc="global batch size", rule=POSITIVE, example=256)
    total_steps: int = field(300_000, doc="joint training steps (Sec. 4: 300k)", rule=NONNEG)
    tokenizer_out: Literal["raw", "ema"] = field(
        "raw", doc="tokenizer handed to refinement: the raw weights (what the official train_dmd.py saves) or an EMA")
    encoder_drop_path: float = field(
        0.0, doc="stochastic depth of the pretrained backbone while DMD trains it (official: timm's DINOv2, "
        "drop_path_rate 0: deterministic latents; EfficientNet-Lite0's own ImageNet recipe used 0.2)",
        rule=UNIT_OPEN_HI)

    def validate(self) -> None:
        self.check(self.t_min < self.t_max, "t_max", f"must be > t_min={self.t_min}", 1.0)
        self.check(self.t_min <= self.t_min_end < self.t_max, "t_min_end",
                   f"must lie in [t_min, t_max) = [{self.t_min}, {self.t_max})", 0.5)


@dataclass
class RefineConfig(Section):
    total_steps: int = field(10_000, doc="decoder fine-tuning steps with the encoder frozen (App. A.4)", rule=NONNEG)
    lr: float = field(1e-4, doc="learning rate", rule=POSITIVE)
    betas: tuple[float, float] = field(OFFICIAL_BETAS, doc="AdamW betas", rule=BETAS)
    weight_decay: float = field(0.0, doc="AdamW weight decay", rule=NONNEG)
    grad_clip: float = field(0.0, doc="gradient-norm clip (0: off)", rule=NONNEG)
    warmup_steps: int = field(0, doc="linear learning-rate warmup steps", rule=NONNEG)
    batch_size: int = field(256, doc="global batch size", rule=POSITIVE, example=256)


@dataclass
class GeneratorConfig(Section):
    size: str = field("L", doc=f"stage-2 LightningDiT size: {', '.join(DIT_SIZES)}", rule=one_of(*DIT_SIZES))
    patch_size: int = field(1, doc="DiT patch size", rule=POSITIVE)
    lr: float = field(2e-4, doc="AdamW learning rate", rule=POSITIVE)
    betas: tuple[float, float] = field(OFFICIAL_BETAS, doc="AdamW betas", rule=BETAS)
    weight_decay: float = field(0.0, doc="AdamW weight decay", rule=NONNEG)
    grad_clip: float = field(1.0, doc="gradient-norm clip (0: off)", rule=NONNEG)
    warmup_steps: int = field(0, doc="linear learning-rate warmup steps", rule=NONNEG)
    batch_size: int = field(256, doc="global batch size", rule=POSITIVE, example=256)
    total_steps: int = field(300_000, doc="training steps (Table 1: DiT-L 300k at batch 256)", rule=NONNEG)
    class_dropout: float = field(0.1, doc="label dropout for CFG", rule=UNIT_OPEN_HI)
    ema_decay: float = field(0.9999, doc="EMA decay", rule=UNIT_OPEN_HI)
    time_sampling: Literal["uniform", "logit_normal"] = field("uniform", doc="flow-matching time law "
                                                              "(official train_diffusion.py: uniform)")
    flip_cache: bool = field(True, doc="cache latents of horizontally flipped images too")
    eval_every: int = field(0, doc="gFID every N steps for the curve of Fig. 8 (0: only at the end)", rule=NONNEG)
    curve_samples: int = field(1000, doc="samples per point of that curve (at most eval.gfid_samples)", rule=ge(2))
    grad_checkpointing: bool = field(False, doc="trade compute for memory")


@dataclass
class EvalConfig(Section):
    gfid_samples: int = field(5000, doc="samples for gFID, class-balanced labels (5000 = the paper's gFID-5k)",
                              rule=POSITIVE, example=5000)
    gfid_ref_images: int | None = field(None, doc="gFID reference: None = every training image, N = a class-balanced "
                                        "random subset of N (cached per dataset and extractor)", rule=ge(2), example=10000)
    rfid_images: int = field(50_000, doc="validation images reconstructed for rFID and PSNR", rule=ge(2))
    sampler: Literal["sde", "ode_euler", "ode_heun"] = field("sde", doc="stage-2 sampler")
    sampler_steps: int = field(250, doc="sampling steps (paper: 250)", rule=ge(2))
    cfg_scale: float = field(1.0, doc="CFG at sampling (paper: none)", rule=ge(1.0))
    extractor: Literal["inception", "lite0"] = field("inception", doc="FID feature extractor")
    batch_size: int = field(250, doc="sampling / feature batch", rule=POSITIVE)
    grid_images: int = field(64, doc="images in the saved sample and reconstruction grids", rule=NONNEG)


@dataclass
class RunConfig(Section):
    name: str = field("table1", doc="study name: results go to <out_dir>/<name>")
    out_dir: str = field("results", doc="results root (made absolute by the studies before Ray starts)")
    store_dir: str | None = field(None, doc="artifact store root (None: <out_dir>/<name>/store)")
    weights_dir: str | None = field(None, doc="pretrained weights dir (None: $DMVAE_WEIGHTS_DIR or ~/.cache)")
    allow_random_weights: bool = field(False, doc="run backbones random-init when weights are missing (labelled)")
    seed: int = field(0, doc="global seed", rule=NONNEG)
    ema_warmup: bool = field(True, doc="EMA decay min(decay, (1+n)/(10+n)) over the first updates; False: plain EMA")
    num_workers: int = field(1, doc="Ray Train workers per stage", rule=POSITIVE)
    use_gpu: bool = field(False, doc="one GPU per Ray Train worker")
    cpus_per_worker: float = field(0.9, doc="CPU reserved per Ray Train worker", rule=POSITIVE)
    threads: int = field(0, doc="torch intra-op threads per worker (0: the CPUs the worker reserves, at least 1)",
                         rule=NONNEG)
    keep_freed_memory: bool = field(True, doc="glibc hosts: large CPU tensors from malloc's heap, freed memory kept "
                                    "(mallopt), not a fresh zero-filled mmap per tensor per step; ~2x on the Lite0 "
                                    "stages on CPU for ~20% more peak RSS (BENCHMARKS.md); no effect on results")
    max_concurrent_trials: int = field(0, doc="Tune concurrency (0: every row at once, the cluster queues)",
                                       rule=NONNEG)
    max_failures: int = field(2, doc="restarts of a stage after a worker loss (Ray FailureConfig)", rule=NONNEG)
    precision: Literal["auto", "fp32", "bf16"] = field("auto", doc="bf16 autocast (on any device) or fp32; auto: "
                                                       "bf16 with run.use_gpu, else fp32. Changes results: part of "
                                                       "the artifact key")
    compile: bool = field(False, doc="torch.compile the DiT")
    checkpoint_every: int = field(1000, doc="checkpoint every N steps of a stage", rule=POSITIVE)
    log_every: int = field(50, doc="reduce and report metrics every N steps", rule=POSITIVE)
    max_nonfinite: int = field(20, doc="consecutive non-finite losses before a stage stops", rule=POSITIVE)
    pg_timeout_s: float = field(1800.0, doc="torch.distributed process-group timeout in seconds", rule=POSITIVE)
    require_shared_storage: bool = field(False, doc="refuse to start on a multi-node cluster when --out is node-local")
    fail_at_step: int | None = field(None, doc="fault injection (tests): a worker exits at this step, first attempt",
                                     rule=NONNEG, example=6)


@dataclass
class ExperimentConfig(Section):
    data: DataConfig = field(factory=DataConfig, doc="dataset")
    tokenizer: TokenizerConfig = field(factory=TokenizerConfig, doc="DMVAE tokenizer pretraining (App. A.1)")
    baseline: TokenizerConfig = field(factory=lambda: TokenizerConfig(
        backbone="ldm_conv", encoder_stride=16, encoder_width=128, projector_hidden=512,
        decoder_ch_mult=(1, 1, 2, 2, 4), disc_start=5001, total_steps=250_000), doc="beta-VAE / VA-VAE baseline rows' autoencoder (Table 1 VAE-baseline)")
    prior: PriorConfig = field(factory=PriorConfig, doc="reference distribution (Sec. 4)")
    teacher: TeacherConfig = field(factory=TeacherConfig, doc="reference score model (App. A.2)")
    dmd: DMDConfig = field(factory=DMDConfig, doc="joint DMD training (Sec. 3.1, App. A.3)")
    refine: RefineConfig = field(factory=RefineConfig, doc="decoder refinement (App. A.4)")
    generator: GeneratorConfig = field(factory=GeneratorConfig, doc="stage-2 DiT (App. A.5)")
    eval: EvalConfig = field(factory=EvalConfig, doc="metrics")
    run: RunConfig = field(factory=RunConfig, doc="execution")

    def validate(self) -> None:
        """Cross-section rules: batches divisible by the workers, latent grids the decoders reach."""
        for section in ("tokenizer", "baseline", "teacher", "dmd", "refine", "generator"):
            sec = getattr(self, section)
            if sec.batch_size % self.run.num_workers:
                raise ConfigError(
                    f"{section}.batch_size={sec.batch_size}: must be a multiple of run.num_workers="
                    f"{self.run.num_workers}, e.g. {section}.batch_size="
                    f"{max(sec.batch_size // self.run.num_workers, 1) * self.run.num_workers}",
                    key=f"{section}.batch_size")
        for section in ("tokenizer", "baseline"):
            check_grid(self, section)
        if self.dmd.encoder_drop_path > 0 and self.tokenizer.backbone not in DROP_PATH_BACKBONES:
            raise ConfigError(
                f"dmd.encoder_drop_path={self.dmd.encoder_drop_path}: stochastic depth is built for "
                f"{', '.join(DROP_PATH_BACKBONES)} only, not tokenizer.backbone={self.tokenizer.backbone!r}; "
                f"set dmd.encoder_drop_path=0", key="dmd.encoder_drop_path")


def latent_shape(cfg: ExperimentConfig, section: str = "tokenizer") -> tuple[int, int, int]:
    """Latent `(C, h, w)` of a tokenizer section: the grid is `data.resolution / encoder_stride`."""
    t, r = getattr(cfg, section), cfg.data.resolution
    return t.latent_channels, r // t.encoder_stride, r // t.encoder_stride


def check_grid(cfg: ExperimentConfig, section: str) -> None:
    """The resolution must be a multiple of the encoder stride, and the decoder must upsample the grid
    back to the resolution exactly."""
    t, r = getattr(cfg, section), cfg.data.resolution
    if r % t.encoder_stride:
        ok = max(r // t.encoder_stride, 1) * t.encoder_stride
        raise ConfigError(f"data.resolution={r}: must be a multiple of {section}.encoder_stride={t.encoder_stride}, "
                          f"e.g. data.resolution={ok}", key="data.resolution")
    ups = len(t.decoder_ch_mult) - 1 + int(t.decoder_in_upsample)
    if 2 ** ups != t.encoder_stride:
        levels = t.encoder_stride.bit_length() - int(t.decoder_in_upsample)
        raise ConfigError(
            f"{section}.decoder_ch_mult={list(t.decoder_ch_mult)}: the decoder upsamples x{2 ** ups} (in_upsample="
            f"{t.decoder_in_upsample}) but the encoder stride is {t.encoder_stride}; use {levels} multipliers, e.g. "
            f"{section}.decoder_ch_mult={[min(2 ** i, 4) for i in range(levels)]}", key=f"{section}.decoder_ch_mult")
