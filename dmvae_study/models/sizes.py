"""LightningDiT sizes by name, apart from the network so that configs can name them without importing torch
(a config check, `--dry-run` or a bad `--set` answers before torch loads)."""

from __future__ import annotations

from typing import NamedTuple


class DiTSize(NamedTuple):
    depth: int
    hidden: int
    heads: int


# Sizes of the official LightningDiT configs (plus a tiny one for tests); DESIGN.md lists them.
LIGHTNINGDIT_PRESETS: dict[str, DiTSize] = {
    "tiny": DiTSize(2, 64, 2),
    "Mini": DiTSize(6, 256, 4),
    "S": DiTSize(12, 384, 6),
    "B": DiTSize(12, 768, 12),
    "L": DiTSize(24, 1024, 16),
    "XL": DiTSize(28, 1152, 16),
}
