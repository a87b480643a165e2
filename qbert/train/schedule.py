"""Learning-rate schedules stepped once per optimizer step by :func:`qbert.train.loop.fit`.

A constant rate is the paper's setting. A linear warm-up followed by a cosine decay to
``min_ratio`` of the peak is the usual BERT recipe: the high early rate gets to the plateau
quickly and the decay then settles the weights instead of letting them wander around it.
The decay spans the configured epoch budget, so early stopping may end a run before the floor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["constant", "cosine"]


def lr_factor(step: int, kind: Schedule, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based)."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {kind!r}; expected 'constant' or 'cosine'")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, kind: Schedule, total_steps: int, warmup_steps: int = 0,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step scheduler, or None when the rate stays constant (nothing to step or checkpoint)."""
    lr_factor(0, kind, total_steps, warmup_steps, min_ratio)  # validate before training starts
    if kind == "constant" and warmup_steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind, total_steps, warmup_steps, min_ratio))
