"""The stage table and the row resolver: what a study row runs, and every value it derives.

A row is a prior (DMVAE trained to match that reference distribution, paper Sec. 4) or a baseline
(`vae`: the LDM-style beta-VAE, `vavae`: VA-VAE). `resolve(cfg, row)` is the one place where a row's
derived values are filled: the DM weight by the prior's kind (Sec. 4), the tokenizer a baseline
trains, a prior's own defaults and hooks. It fills only what the user left unset (`None`).

`STAGES` declares each stage once: the trainers module that runs it, the config keys that key its
artifact, the stages (of this row or of a derived row) it consumes, and the rows it applies to.
Artifact keys chain through `inputs`, so changing `generator.*` reuses everything before the
generator, and changing the tokenizer recomputes everything after it. The library imports no
trainer: a stage names its module, which the runner (`trainers.launch`) imports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from dmvae_study.config import ExperimentConfig
from dmvae_study.configlib import ConfigError
from dmvae_study.store import ArtifactDir, ArtifactStore

BASELINE_ROWS: dict[str, str] = {"vae": "beta_vae", "vavae": "vavae"}  # row -> the tokenizer kind it pretrains
RUN_KEYS = ("seed", "allow_random_weights", "ema_warmup")  # run fields that change results (not workers, paths)
# and `run.precision`, keyed through `amp_precision` (below): only bf16 adds to a key, so fp32 keys are unchanged

Inputs = dict[str, tuple[str, ExperimentConfig]]  # label -> (stage, config of the row it belongs to)


@dataclass(frozen=True)
class LaunchOptions:
    """How a row's stages are launched (never part of an artifact key)."""

    stages: tuple[str, ...] | None = None        # only these stages (their inputs are built when missing)
    ray: bool = False                            # inside a Ray Train worker group
    report: Literal["none", "train", "tune"] = "none"  # where per-interval metrics go besides metrics.jsonl
    row: str | None = None                       # the study row's name (progress lines, the row's log file)
    log_file: str | None = None                  # `<out>/<study>/logs/<row>.log`: progress lines and warnings


@dataclass(frozen=True)
class Stage:
    name: str
    module: str                                   # trainers module whose `run(ctx, art)` trains the stage
    keys: tuple[str, ...]                         # config sections or dotted fields that key the artifact
    inputs: Callable[[ExperimentConfig], Inputs]  # artifacts it consumes
    applies: Callable[[ExperimentConfig], bool]   # rows it runs for
    extra_key: Callable[[ExperimentConfig], dict] | None = None
    makes_tokenizer: bool = False                 # writes `tokenizer.pt` (a tokenizer later stages load)

    def body(self) -> Callable[..., dict]:
        return importlib.import_module(self.module).run


def is_baseline(cfg: ExperimentConfig) -> bool:
    return cfg.prior.name in BASELINE_ROWS


def is_prior(cfg: ExperimentConfig) -> bool:
    return not is_baseline(cfg)


def every_row(cfg: ExperimentConfig) -> bool:
    return True


def tokenizer_kind(cfg: ExperimentConfig) -> str:
    """`ae` (DMVAE's deterministic tokenizer, App. A.1), `beta_vae` or `vavae` (the baseline rows)."""
    return BASELINE_ROWS.get(cfg.prior.name, "ae")


def final_tokenizer(cfg: ExperimentConfig) -> str:
    """The stage whose tokenizer stage 2 uses: the refined DMVAE for priors, the pretrained one for baselines."""
    return "refine" if is_prior(cfg) else "tokenizer"


def _same(*names: str) -> Callable[[ExperimentConfig], Inputs]:
    return lambda cfg: {n: (n, cfg) for n in names}


def _prior_inputs(cfg: ExperimentConfig) -> Inputs:
    from priors import get  # the registry: a prior declares what it needs where it is registered
    return get(cfg.prior.name).needs(cfg) if get(cfg.prior.name).needs else {}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer", "trainers.tokenizer", ("data", "tokenizer"), _same(), every_row,
          extra_key=lambda cfg: {"kind": tokenizer_kind(cfg)}, makes_tokenizer=True),
    Stage("reference", "trainers.reference", ("data", "prior"), _prior_inputs, is_prior),
    Stage("teacher", "trainers.teacher", ("teacher",), _same("reference"), is_prior),
    Stage("dmd", "trainers.dmd", ("dmd",), _same("tokenizer", "reference", "teacher"), is_prior,
          makes_tokenizer=True),
    Stage("refine", "trainers.refine", ("refine",), _same("dmd"), is_prior, makes_tokenizer=True),
    Stage("latents", "trainers.latents", ("generator.flip_cache",),
          lambda cfg: {"tokenizer": (final_tokenizer(cfg), cfg)}, every_row),
    Stage("generator", "trainers.generator", ("generator",), _same("latents"), every_row),
    Stage("eval", "trainers.evaluate", ("eval",), _same("generator", "latents"), every_row),
)}


# ---- rows ------------------------------------------------------------------------------------------

def resolve(cfg: ExperimentConfig, row: str | None = None) -> ExperimentConfig:
    """The config of one row with every derived value filled once (a value the user set is kept).

    - baselines train their own autoencoder: `tokenizer` becomes the `baseline` section;
    - priors: `dmd.dm_weight` by kind when unset (Sec. 4: 10 data-derived, 1 synthetic),
      `prior.reduction` from the prior's registration when unset (and checked against what it supports),
      then the prior's own `resolve` hook (e.g. ldm_noise picks its LDM autoencoder)."""
    if row is not None:
        cfg = cfg.replace(prior=cfg.prior.replace(name=row))
    name = cfg.prior.name
    if name in BASELINE_ROWS:
        return cfg.replace(tokenizer=cfg.baseline)
    from priors import DM_WEIGHT, UnknownPriorError, get
    try:
        spec = get(name)
    except UnknownPriorError as e:
        raise ConfigError(f"prior.name={name}: {e}; e.g. prior.name=dinov2", key="prior.name") from None
    dmd, prior = cfg.dmd, cfg.prior
    if dmd.dm_weight is None:
        dmd = dmd.replace(dm_weight=DM_WEIGHT[spec.kind])
    if prior.reduction is None:
        prior = prior.replace(reduction=spec.reduction)
    elif prior.reduction not in spec.reductions:
        raise ConfigError(f"prior.reduction={prior.reduction}: prior {name} supports {', '.join(spec.reductions)}, "
                          f"e.g. prior.reduction={spec.reduction}", key="prior.reduction")
    cfg = cfg.replace(dmd=dmd, prior=prior)
    return spec.resolve(cfg) if spec.resolve else cfg


def derived(cfg: ExperimentConfig) -> dict[str, Any]:
    """The effective values a study derives per row (resolved config in), for manifests and table columns."""
    if is_baseline(cfg):
        t = cfg.tokenizer
        stand_in = (f"aligned to {t.vavae_backbone} in DINOv2's place" if tokenizer_kind(cfg) == "vavae"
                    and not t.vavae_backbone.startswith("dinov2") else None)
        return {"kind": "baseline", "tokenizer": tokenizer_kind(cfg), "dm_weight": None, "cfg_scale": None,
                "timestep_schedule": None, "score_net_size": None, "reduction": None, "stand_in": stand_in,
                "precision": amp_precision(cfg)}
    from priors import get
    spec = get(cfg.prior.name)
    out = {"kind": spec.kind, "tokenizer": "ae", "dm_weight": cfg.dmd.dm_weight, "cfg_scale": cfg.dmd.cfg_scale,
           "timestep_schedule": cfg.dmd.timestep_schedule, "score_net_size": cfg.teacher.size,
           "reduction": cfg.prior.reduction, "stand_in": spec.stand_in(cfg) if spec.stand_in else None,
           "precision": amp_precision(cfg)}
    if cfg.prior.name == "ldm_noise":
        out["ldm_source"] = cfg.prior.ldm_source
    return out


def required_weights(cfg: ExperimentConfig) -> dict[str, bool]:
    """Pretrained weights a (resolved) row needs, `{name: may run random-init}`: the backbones of every
    tokenizer it trains or consumes (its own, a prior's reference tokenizer, the LDM), VA-VAE's alignment
    backbone, the text encoder, LPIPS and the FID extractor (those two never run random-init)."""
    from dmvae_study.weights import WEIGHTS
    need: dict[str, bool] = {}
    seen: set[str] = set()

    def visit(stage: str, c: ExperimentConfig) -> None:
        key = f"{stage}:{artifact(c, stage).path.name}"
        if key in seen:
            return
        seen.add(key)
        for st, c2 in STAGES[stage].inputs(c).values():
            visit(st, c2)
        if stage == "tokenizer":
            t = c.tokenizer
            for name in (t.backbone, t.vavae_backbone if tokenizer_kind(c) == "vavae" else None):
                if name in WEIGHTS:
                    need.setdefault(name, True)
            if t.lpips_weight > 0:
                need[{"vgg": "vgg16", "alex": "alexnet"}[t.lpips_net]] = False
    for stage in plan(cfg):
        visit(stage, cfg)
    if cfg.prior.name == "siglip_text" and cfg.prior.text_encoder in ("siglip", "minilm"):
        need[{"siglip": "siglip_vitb16", "minilm": "minilm"}[cfg.prior.text_encoder]] = False
    if cfg.prior.name == "ldm_noise" and cfg.prior.ldm_source == "staged":
        need["sd_vae_ft_ema"] = False
    need[{"inception": "inception_fid", "lite0": "efficientnet_lite0"}[cfg.eval.extractor]] = False
    return need


def plan(cfg: ExperimentConfig, stages: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Stages this row runs, in table order (optionally only the requested ones)."""
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return [n for n, s in STAGES.items() if s.applies(cfg) and (stages is None or n in stages)]


# ---- artifacts -------------------------------------------------------------------------------------

def _value(cfg: ExperimentConfig, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node.to_dict() if hasattr(node, "to_dict") else node


def amp_precision(cfg: ExperimentConfig) -> str:
    """The precision a stage of this config computes in, from the config alone: `run.precision`, where
    `auto` is bf16 autocast for GPU workers (`run.use_gpu`) and fp32 otherwise. `StageContext.autocast`
    follows it, and a bf16 stage's artifact key carries it, so a store never hands a bf16 artifact to an
    fp32 run or the other way round."""
    return effective_precision(cfg.run.precision, cfg.run.use_gpu)


def effective_precision(precision: str, use_gpu: bool) -> str:
    """`amp_precision`'s rule on the two settings (also for manifests' flattened configs)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and use_gpu) else "fp32"


def artifact_key(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    """What determines a stage's artifact: its config keys, the result-changing run fields, and the keys
    of every input artifact (recursively)."""
    s = STAGES[stage]
    key: dict[str, Any] = {k: _value(cfg, k) for k in s.keys}
    if s.extra_key is not None:
        key.update(s.extra_key(cfg))
    key["run"] = {k: getattr(cfg.run, k) for k in RUN_KEYS}
    if amp_precision(cfg) == "bf16":  # fp32 adds nothing: the keys (and stores, manifests) of before stay valid
        key["run"]["precision"] = "bf16"
    key["inputs"] = {label: artifact_key(c, st) for label, (st, c) in s.inputs(cfg).items()}
    return key


def store_of(cfg: ExperimentConfig) -> ArtifactStore:
    return ArtifactStore(cfg.run.store_dir or Path(cfg.run.out_dir) / cfg.run.name / "store")


def artifact(cfg: ExperimentConfig, stage: str) -> ArtifactDir:
    """The artifact folder of `stage` for this (resolved) row config."""
    return store_of(cfg).artifact(stage, artifact_key(cfg, stage))


def input_artifact(cfg: ExperimentConfig, stage: str, label: str) -> ArtifactDir:
    """The artifact a stage consumes under `label` (e.g. the reference stage's `tokenizer`)."""
    st, c = STAGES[stage].inputs(cfg)[label]
    return artifact(c, st)


def shared_work(cfgs: list[ExperimentConfig]) -> list[tuple[str, ExperimentConfig]]:
    """(stage, config) pairs that two or more rows need (their plans and inputs), in dependency order:
    a study runs them once before its trials, so concurrent trials do not queue on one artifact."""
    seen: dict[str, tuple[str, ExperimentConfig, int]] = {}
    order: list[str] = []

    def visit(stage: str, c: ExperimentConfig, row: int, path: set[str]) -> None:
        for st, c2 in STAGES[stage].inputs(c).values():
            visit(st, c2, row, path)
        d = artifact(c, stage).path.name
        if d in path:
            return
        path.add(d)
        if d not in seen:
            seen[d] = (stage, c, 0)
            order.append(d)
        st_, c_, n = seen[d]
        seen[d] = (st_, c_, n + 1)

    for i, c in enumerate(cfgs):
        mine: set[str] = set()
        for stage in plan(c):
            visit(stage, c, i, mine)
    return [(seen[d][0], seen[d][1]) for d in order if seen[d][2] >= 2]


__all__ = ["BASELINE_ROWS", "LaunchOptions", "RUN_KEYS", "STAGES", "Stage", "amp_precision", "artifact", "artifact_key",
           "derived", "effective_precision",
           "final_tokenizer", "input_artifact", "is_baseline", "is_prior", "plan", "required_weights", "resolve",
           "shared_work",
           "store_of", "tokenizer_kind"]
