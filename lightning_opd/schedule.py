"""The learning-rate schedule shared by OPD training and the SFT warm start."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
