"""Reference distributions of the prior-selection study (paper Sec. 4): one name -> one builder.

Every module of this package other than the infrastructure below is a prior and registers itself
on import (`@register`), so adding a prior is adding one file. `ROWS` (baselines, then priors in
the paper's Table 1 order) feeds the studies' CLI and Tune choices.

    from priors import BuildContext, build_reference
    ref = build_reference(BuildContext(cfg=cfg, art=art, device="cuda"))
"""

from __future__ import annotations

import importlib
import pkgutil

from priors.reduce import BottleneckReducer, PCAReducer, reduce
from priors.registry import (BASELINE_ROWS, DM_WEIGHT, FEATURE_REDUCTIONS, REDUCTIONS, BuildContext, PriorSpec,
                             UnknownPriorError, build_reference, get, latent_grid, names, register, sample_count)

_INFRA = frozenset({"registry", "reduce", "extract", "tsne"})
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _INFRA and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

ROWS: tuple[str, ...] = tuple(BASELINE_ROWS) + names()

__all__ = ["BASELINE_ROWS", "DM_WEIGHT", "FEATURE_REDUCTIONS", "REDUCTIONS", "ROWS", "BottleneckReducer",
           "BuildContext", "PCAReducer", "PriorSpec", "UnknownPriorError", "build_reference", "get", "latent_grid",
           "names", "reduce", "register", "sample_count"]
