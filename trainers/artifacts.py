"""Which config sections key which artifact: a rerun reuses, a changed config recomputes.

Keys chain through the pipeline, so changing the tokenizer recomputes everything after it, while
changing only `generator.*` reuses the tokenizer, reference set, teacher and DMD artifacts.
Rows: `vae` (beta-VAE, no DM), `vavae` (VA-VAE alignment), or a prior name (DMVAE with that prior).
"""

from __future__ import annotations

from dmvae_study.config import ExperimentConfig
from dmvae_study.store import ArtifactDir, config_digest
from trainers.common import store_of

BASELINE_ROWS = ("vae", "vavae")
RUN_KEYS = ("seed", "allow_random_weights", "ema_warmup")  # run fields that change results (not workers, paths)


def _run(cfg: ExperimentConfig) -> dict:
    return {k: getattr(cfg.run, k) for k in RUN_KEYS}


def tokenizer_key(cfg: ExperimentConfig, kind: str | None = None) -> dict:
    tok = cfg.tokenizer.to_dict()
    if kind is not None:
        tok["kind"] = kind
    return {"data": cfg.data.to_dict(), "tokenizer": tok, "run": _run(cfg)}


def row_kind(cfg: ExperimentConfig) -> str:
    """Tokenizer kind a row pretrains: DMVAE rows share the plain AE; baselines train their own."""
    return {"vae": "beta_vae", "vavae": "vavae"}.get(cfg.prior.name, "ae")


def tokenizer(cfg: ExperimentConfig, kind: str | None = None) -> ArtifactDir:
    return store_of(cfg).artifact("tokenizer", tokenizer_key(cfg, kind or row_kind(cfg)))


def reference_key(cfg: ExperimentConfig) -> dict:
    prior = cfg.prior.to_dict()
    prior.pop("dm_weight")  # weights the DM loss, not the reference set
    key = {"data": cfg.data.to_dict(), "prior": prior, "run": _run(cfg)}
    if cfg.prior.name == "ldm_noise" and cfg.prior.ldm_source == "baseline_vae":
        key["ldm"] = tokenizer_key(cfg, "beta_vae")
    return key


def reference(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("reference", reference_key(cfg))


def teacher(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("teacher", {"reference": reference_key(cfg), "teacher": cfg.teacher.to_dict()})


def dm_weight(cfg: ExperimentConfig) -> float:
    """Prior's DM weight: explicit `prior.dm_weight`, else the DMD section's value."""
    return cfg.prior.dm_weight if cfg.prior.dm_weight is not None else cfg.dmd.dm_weight


def dmd_key(cfg: ExperimentConfig) -> dict:
    dmd = cfg.dmd.to_dict()
    dmd["dm_weight"] = dm_weight(cfg)
    return {"tokenizer": tokenizer_key(cfg, "ae"), "reference": reference_key(cfg),
            "teacher": cfg.teacher.to_dict(), "dmd": dmd}


def dmd(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("dmd", dmd_key(cfg))


def final_tokenizer_key(cfg: ExperimentConfig) -> dict:
    """The tokenizer stage 2 uses: refined DMVAE for prior rows, the pretrained one for baselines."""
    if cfg.prior.name in BASELINE_ROWS:
        return {"pretrain": tokenizer_key(cfg, row_kind(cfg))}
    return {"dmd": dmd_key(cfg), "refine": cfg.refine.to_dict()}


def refine(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("refine", final_tokenizer_key(cfg))


def final_tokenizer(cfg: ExperimentConfig) -> ArtifactDir:
    return tokenizer(cfg) if cfg.prior.name in BASELINE_ROWS else refine(cfg)


def generator_key(cfg: ExperimentConfig) -> dict:
    return {"tokenizer": final_tokenizer_key(cfg), "generator": cfg.generator.to_dict()}


def latents(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("latents", {"tokenizer": final_tokenizer_key(cfg),
                                              "flip": cfg.generator.flip_cache})


def generator(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("generator", generator_key(cfg))


def evaluation(cfg: ExperimentConfig) -> ArtifactDir:
    return store_of(cfg).artifact("eval", {"generator": generator_key(cfg), "eval": cfg.eval.to_dict()})


__all__ = ["BASELINE_ROWS", "config_digest", "dm_weight", "dmd", "evaluation", "final_tokenizer", "generator",
           "latents", "reference", "refine", "teacher", "tokenizer"]
