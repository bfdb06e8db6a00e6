"""Exponential moving average of a module's weights (with the warmup short runs need), and `unwrap`."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    With `warmup` the decay of update n (0-based) is `min(decay, (1 + n) / (10 + n))`, the
    TensorFlow `num_updates` convention diffusers also uses: short runs are not dominated by the
    initial weights (plain decay 0.999 after 800 steps keeps 45% of them), and long runs are
    unchanged (the cap binds from n = 9/(1 - decay) - 1). `warmup=False` is the official code's
    plain EMA. `updates` is checkpointed with the shadow weights."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = copy.deepcopy(unwrap(module)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One fused `_foreach_lerp_` over all floating tensors (a loop is ~400 small launches for XL)."""
        src = unwrap(module).state_dict()
        dst = self.shadow.state_dict()
        floats = [k for k, v in dst.items() if v.dtype.is_floating_point]
        decay = self.current_decay()
        self.updates += 1
        torch._foreach_lerp_([dst[k] for k in floats], [src[k].to(dst[k].dtype) for k in floats], 1.0 - decay)
        for k, v in dst.items():
            if not v.dtype.is_floating_point:
                v.copy_(src[k])


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
