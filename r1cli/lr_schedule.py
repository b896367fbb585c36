"""The learning-rate schedule: linear warmup, then constant or cosine down to min_lr_ratio."""

from __future__ import annotations

import math

from r1cli.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based)."""
    warmup = optim.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
