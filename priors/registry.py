"""The priors registry: one name -> one builder of a reference set (paper Sec. 4).

A prior is one module in this package whose builder is decorated with
`@register("name", kind="data" | "synthetic")`; everything a study needs to know about it is declared
there (its default reduction, the artifacts it needs, a resolve hook, what it stands in for), so
adding a prior is adding one file. `kind` is the paper's family (Sec. 4):
"data" is Category 1 (data-derived: DINOv2, ResNet, SigLIP text, LDM noise states) and
"synthetic" is Category 2 (data-independent: Gaussian, GMM, and the sub-sampled SSL features,
which the paper files there because they do not represent the full data distribution).
The kind sets the default DM weight of the study (Sec. 4: 10 for data-derived priors, 1 for
synthetic ones). `build_reference(ctx)` is the one entry point stages call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist

from dmvae_study.config import ExperimentConfig, latent_shape
from dmvae_study.pipeline import BASELINE_ROWS, Inputs
from dmvae_study.reference import ReferenceSet
from dmvae_study.store import ArtifactDir

log = logging.getLogger(__name__)

Kind = Literal["data", "synthetic"]
DM_WEIGHT: dict[str, float] = {"data": 10.0, "synthetic": 1.0}  # Sec. 4, "Experimental Setting"
REDUCTIONS = ("tokenizer", "feature_ae", "pca", "none")   # prior.reduction (Sec. 3.2)
FEATURE_REDUCTIONS = ("feature_ae", "pca", "none")         # for priors without an image backbone
WAIT_TIMEOUT_S = 6 * 3600.0  # how long a rank waits for the other ranks' shards / rank 0's save


class UnknownPriorError(ValueError):
    """A prior name that is not registered (the message lists the registered ones)."""


@dataclass
class BuildContext:
    """Everything a builder needs. Shard i of an extraction is computed by rank `i % world`;
    rank 0 then reduces, standardises and saves into `art`."""

    cfg: ExperimentConfig
    art: ArtifactDir                           # where feature shards and the reference set go
    device: torch.device | str = "cpu"
    rank: int = 0
    world: int = 1
    # the artifacts the prior declared in `needs`, built before it (label -> folder)
    inputs: dict[str, ArtifactDir] = dataclasses.field(default_factory=dict)
    progress: bool = False                     # tqdm bars (rank 0 of a stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, *keys: object) -> int:
        """A 63-bit seed from (run.seed, prior name, keys): streams independent of each other."""
        blob = json.dumps([self.cfg.run.seed, self.cfg.prior.name, *map(str, keys)]).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)

    def generator(self, *keys: object) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed(*keys))


Builder = Callable[[BuildContext], ReferenceSet]


@dataclass(frozen=True)
class PriorSpec:
    name: str
    kind: Kind
    build: Builder
    order: int                  # position in the study tables (the paper's Table 1 order)
    doc: str                    # first docstring line of the builder
    reduction: str              # default prior.reduction
    reductions: tuple[str, ...]  # the reductions it supports
    needs: Callable[[ExperimentConfig], Inputs] | None = None   # artifacts built before its reference set
    resolve: Callable[[ExperimentConfig], ExperimentConfig] | None = None  # fills the prior's derived fields
    stand_in: Callable[[ExperimentConfig], str | None] | None = None       # "what stands in for what" label


_REGISTRY: dict[str, PriorSpec] = {}


def register(name: str, *, kind: Kind, order: int = 100, reduction: str = "feature_ae",
             reductions: tuple[str, ...] = FEATURE_REDUCTIONS, needs: Callable[[ExperimentConfig], Inputs] | None = None,
             resolve: Callable[[ExperimentConfig], ExperimentConfig] | None = None,
             stand_in: Callable[[ExperimentConfig], str | None] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: `@register("gmm", kind="synthetic")` makes `build(ctx) -> ReferenceSet` a prior.

    `reduction` / `reductions`: its default and allowed `prior.reduction`; `needs(cfg)`: artifacts it
    consumes, `{label: (stage, row config)}` (e.g. the study's beta-VAE tokenizer), handed to the
    builder as `ctx.inputs[label]`; `resolve(cfg)`: fills its own derived config fields; `stand_in(cfg)`:
    a label saying what this row stands in for at this preset (e.g. "Lite0 in DINOv2's place")."""
    if kind not in DM_WEIGHT:
        raise ValueError(f"prior {name!r}: kind must be one of {', '.join(DM_WEIGHT)}, got {kind!r}")
    if name in BASELINE_ROWS:
        raise ValueError(f"{name!r} is a baseline row name and cannot be a prior")
    if reduction not in reductions or not set(reductions) <= set(REDUCTIONS):
        raise ValueError(f"prior {name!r}: reduction {reduction!r} must be one of its reductions {reductions}")

    def deco(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and (old.build.__module__, old.build.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"prior {name!r} is registered twice ({old.build.__module__} and {fn.__module__})")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = PriorSpec(name, kind, fn, order, doc, reduction, tuple(reductions), needs, resolve,
                                    stand_in)
        return fn
    return deco


def names() -> tuple[str, ...]:
    """Registered prior names in table order: the one source of CLI and Tune choices."""
    return tuple(s.name for s in sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name)))


def get(name: str) -> PriorSpec:
    if name not in _REGISTRY:
        extra = (f"; {name!r} is a baseline row ({', '.join(BASELINE_ROWS)}) and has no reference set"
                 if name in BASELINE_ROWS else "")
        raise UnknownPriorError(f"unknown prior {name!r}; registered priors: {', '.join(names())}{extra}")
    return _REGISTRY[name]


def latent_grid(cfg: ExperimentConfig) -> tuple[int, int]:
    """Token grid `(h, w)` of the DMVAE tokenizer latent: `data.resolution // tokenizer.encoder_stride`
    (`dmvae_study.config.latent_shape`). Spatial priors are built on this grid, so the DMD projection
    head is a per-token MLP (paper: 16x16 for DINOv2-L/16 at 256 px)."""
    _, h, w = latent_shape(cfg)
    return h, w


def sample_count(cfg: ExperimentConfig) -> int:
    """Samples a synthetic prior draws: `prior.num_samples`, else one per training image
    (the training-set size after `data.train_limit`)."""
    if cfg.prior.num_samples is not None:
        return cfg.prior.num_samples
    from dmvae_study.data import build_dataset
    return len(build_dataset(cfg.data, "train", hflip=False))


class HandedOff(Exception):
    """Raised on ranks > 0 once their feature shards are written: rank 0 finishes the build."""


def wait_for(paths: list, what: str, timeout_s: float = WAIT_TIMEOUT_S, poll_s: float = 1.0) -> None:
    """Poll until every path exists (files are renamed into place atomically, so existence means
    complete), or raise TimeoutError naming the missing ones."""
    end = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}; still missing {len(missing)}: "
                               f"{', '.join(str(p) for p in missing[:5])}")
        time.sleep(poll_s)


def _dist_on(ctx: BuildContext) -> bool:
    return ctx.world > 1 and dist.is_available() and dist.is_initialized()


def build_reference(ctx: BuildContext) -> ReferenceSet:
    """Build (or reload) the prior's reference set in `ctx.art` and return it on every rank.

    Registry lookup, the builder (extraction in resumable shards, reduction to `prior.reduced_dim`
    per Sec. 3.2, standardisation), common provenance, then an atomic `ReferenceSet.save` on rank 0.
    A finished set (meta.json present) is loaded instead of rebuilt."""
    spec = get(ctx.cfg.prior.name)
    meta = ctx.art.file("meta.json")
    if meta.exists():
        try:
            return ReferenceSet.load(ctx.art)
        except Exception as e:  # a corrupt shard: rebuild (feature shards make this cheap)
            log.warning("reference set in %s is unreadable (%s); rebuilding", ctx.art.path, e)
            if ctx.is_main:
                meta.unlink(missing_ok=True)
    t0 = time.time()
    ref: ReferenceSet | None
    try:
        ref = spec.build(ctx)
    except HandedOff:
        ref = None
    if ref is not None and ctx.is_main:
        cfg = ctx.cfg
        common = {"prior": spec.name, "kind": spec.kind, "dataset": cfg.data.dataset,
                  "data_root": cfg.data.root, "resolution": cfg.data.resolution, "count": len(ref),
                  "sample_shape": list(ref.sample_shape), "seed": cfg.run.seed, "reduction": cfg.prior.reduction,
                  "artifact": ctx.art.path.name, "world": ctx.world, "build_s": round(time.time() - t0, 2)}
        ref.provenance = {**common, **ref.provenance}
        ref.provenance["random_init"] = "random-init" in str(ref.provenance.get("weights_source", ""))
        ref.save(ctx.art, cfg.prior.shard_size)
    if _dist_on(ctx):
        dist.barrier()
    elif ctx.world > 1 and not ctx.is_main:
        wait_for([meta], f"rank 0 to save the {spec.name} reference set")
    return ref if ref is not None else ReferenceSet.load(ctx.art)
