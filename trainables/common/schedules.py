"""Weight ramps and learning-rate schedules (schedulers step once per epoch)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler

SCHEDULERS = ("cosine", "constant")


def linear_ramp(progress: float, length: float) -> float:
    """clip(progress / length, 0, 1): DivideMix / Co-Reg's ramp of the unlabeled weight."""
    if length <= 0:
        return 1.0 if progress >= 0 else 0.0
    return min(max(progress / length, 0.0), 1.0)


def warmup_length(epochs: int, min_steps: int, steps_per_epoch: int, budget: int, max_fraction: float) -> int:
    """Warm-up epochs: ``epochs``, lengthened to reach ``min_steps`` optimiser steps where the budget
    allows, never past ``max_fraction`` of the ``budget`` epochs (nor shortened below ``epochs``)."""
    needed = -(-min_steps // max(steps_per_epoch, 1))  # ceil
    return max(epochs, min(needed, int(max_fraction * budget)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, period: int, *, eta_min_ratio: float = 0.0
) -> LRScheduler:
    """``cosine``: lr_0 -> eta_min_ratio * lr_0 over ``period`` epochs; ``constant``: lr_0 throughout."""
    if name == "cosine":
        eta_min = eta_min_ratio * optimizer.param_groups[0]["lr"]
        return CosineAnnealingLR(optimizer, T_max=max(period, 1), eta_min=eta_min)
    if name == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
