"""MixUp as MixMatch uses it (Zhang et al. 2018; Berthelot et al. 2019; Co-Reg Eq. 14-17), and its losses."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.common.losses import mean_or_zero, soft_ce, squared_error


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


def mix_batch(
    inputs: Tensor, targets: Tensor, alpha: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """MixUp of a batch with a random permutation of itself: lambda, then the permutation, both from ``generator``."""
    lam = sample_mix_lambda(alpha, generator)
    perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
    return mixup(inputs, targets, lam, perm)


def mixup_ce(net: nn.Module, inputs: Tensor, targets: Tensor, alpha: float, generator: torch.Generator) -> Tensor:
    """Cross-entropy of ``net`` on the mixed batch to the mixed targets (PiCO+, ALIM's MixUp term). Scalar."""
    mixed_inputs, mixed_targets = mix_batch(inputs, targets, alpha, generator)
    return soft_ce(net(mixed_inputs), mixed_targets).mean()


def mixmatch(
    views_x: Sequence[Tensor], views_u: Sequence[Tensor], targets_x: Tensor, targets_u: Tensor,
    alpha: float, generator: torch.Generator,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """MixUp over [X views..., U views...], each view with its split's targets (MixMatch; Co-Reg Eq. 14-17)."""
    inputs = torch.cat([*views_x, *views_u])
    targets = torch.cat([targets_x] * len(views_x) + [targets_u] * len(views_u))
    return mix_batch(inputs, targets, alpha, generator)


def mixmatch_losses(logits: Tensor, mixed_targets: Tensor, n_x: int) -> tuple[Tensor, Tensor]:
    """(CE on the first ``n_x`` rows, the X part; MSE of the softmax on the others, the U part), scalars.

    DivideMix's ``SemiLoss`` and Co-Reg's Eq. 9; each mixed row keeps the loss of its first input.
    """
    loss_x = soft_ce(logits[:n_x], mixed_targets[:n_x]).mean()
    loss_u = mean_or_zero(squared_error(F.softmax(logits[n_x:], dim=1), mixed_targets[n_x:]))
    return loss_x, loss_u
