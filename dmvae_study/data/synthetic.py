"""Procedural coloured shapes: images for unit tests that must not need data files."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dmvae_study.data.common import _EpochAugment, _to_tensor

# ---- procedural shapes (tests only) --------------------------------------------------------------

class SyntheticShapes(_EpochAugment, Dataset):
    """Deterministic coloured shapes on a dark background: class k draws shape k (mod 8) in hue
    k / num_classes, with per-item position, size and colour jitter from (seed, split, index).
    For unit tests that need images without data files; presets use real data."""

    SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "hbar", "vbar")

    def __init__(self, n: int = 512, resolution: int = 32, num_classes: int = 4, channels: int = 3,
                 hflip: bool = False, seed: int = 0, split: str = "train", flip_seed: int = 0):
        self.n, self.resolution, self.num_classes, self.channels = n, resolution, num_classes, channels
        self.hflip, self.seed, self.split, self.flip_seed = hflip, seed, split, flip_seed
        self.classes = [f"{self.SHAPES[k % len(self.SHAPES)]}{k}" for k in range(num_classes)]
        self.targets = [i % num_classes for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        r = self.resolution
        yy, xx = np.meshgrid(np.linspace(-1, 1, r), np.linspace(-1, 1, r), indexing="ij")
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        s = rng.uniform(0.35, 0.6)
        y, x = (yy - cy) / s, (xx - cx) / s
        shape = self.SHAPES[label % len(self.SHAPES)]
        mask = {"disk": x**2 + y**2 <= 1, "square": np.maximum(abs(x), abs(y)) <= 0.8,
                "triangle": (y <= 0.8) & (y >= 2 * abs(x) - 1), "ring": abs(np.hypot(x, y) - 0.75) <= 0.25,
                "cross": (np.minimum(abs(x), abs(y)) <= 0.25) & (np.maximum(abs(x), abs(y)) <= 1),
                "diamond": abs(x) + abs(y) <= 1, "hbar": (abs(y) <= 0.3) & (abs(x) <= 1),
                "vbar": (abs(x) <= 0.3) & (abs(y) <= 1)}[shape]
        hue = (label / self.num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        colour = np.array(_hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        img = rng.uniform(0.0, 0.12, (r, r, 1)) * np.ones(3) + mask[..., None] * colour
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        t = _to_tensor(arr)
        if self.channels == 1:
            t = t.mean(0, keepdim=True)
        return (t.flip(-1) if self._flip(index) else t), label


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


