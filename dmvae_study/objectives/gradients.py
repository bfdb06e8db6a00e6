"""Gradient plumbing shared by the objectives: keeping a network out of a loss's backward pass, and
the grad-norm-ratio weight that balances two losses at one layer (LDM's adaptive GAN weight, VA-VAE's
adaptive alignment weight)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


@contextmanager
def frozen(*nets: Any) -> Iterator[None]:
    """Build the graph inside this block with the nets' parameters excluded from autograd.

    Gradients still flow through the nets to their *inputs*; the parameters receive none, even when
    `backward()` runs after the block (the graph records no parameter leaves). The previous
    `requires_grad` flags are restored on exit. Non-`nn.Module` arguments (closed-form callables,
    None) are ignored; a module passed twice is handled once.
    """
    params = {id(p): p for n in nets if isinstance(n, nn.Module) for p in n.parameters() if p.requires_grad}
    for p in params.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params.values():
            p.requires_grad_(True)


def grad_norm_ratio(numerator: torch.Tensor, denominator: torch.Tensor, layer: torch.Tensor,
                    eps: float = 1e-6, max_value: float = 1e4) -> torch.Tensor:
    """`||d numerator / d layer|| / (||d denominator / d layer|| + eps)`, clamped to [0, max_value], detached.

    The LDM / taming adaptive weight (Esser et al. 2021, Eq. 10 of the DMVAE paper uses it with
    lambda = 0.5): the second loss is rescaled so its gradient at `layer` (usually the decoder's last
    conv weight) is as large as the first one's. Both graphs are retained for the real backward.
    """
    if not layer.requires_grad:
        raise ValueError("the adaptive weight needs a layer that requires grad (is the decoder frozen?)")
    g_num = torch.autograd.grad(numerator, layer, retain_graph=True, allow_unused=True)[0]
    g_den = torch.autograd.grad(denominator, layer, retain_graph=True, allow_unused=True)[0]
    if g_num is None or g_den is None:
        which = "numerator" if g_num is None else "denominator"
        raise ValueError(f"the {which} loss does not depend on the given layer; pass the layer both losses reach")
    ratio = g_num.detach().norm() / (g_den.detach().norm() + eps)
    return ratio.clamp(0.0, max_value)


__all__ = ["frozen", "grad_norm_ratio"]
