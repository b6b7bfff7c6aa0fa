"""MixUp as MixMatch uses it (Zhang et al. 2018; Berthelot et al. 2019; Co-Reg Eq. 14-17)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sample_mix_lambda(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda) so the first input dominates (Eq. 14-15).

    torch cannot draw Beta samples from a ``torch.Generator``, so one integer drawn from
    ``generator`` seeds a numpy generator: the value is reproducible from ``generator`` alone.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(inputs: Tensor, targets: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Interpolate every row with row ``perm[i]`` of the same batch (Eq. 16-17)."""
    mixed_inputs = lam * inputs + (1.0 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_inputs, mixed_targets
