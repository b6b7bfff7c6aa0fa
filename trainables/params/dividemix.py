"""DivideMix: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/dividemix.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec, starred_variant


@dataclass(frozen=True)
class DivideMixParams:
    starred: bool = False
    """DivideMix*: learn from the template-average argmax instead of template ``single_template``."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    """CE warm-up epochs (reference: 10 of 300 on CIFAR-10, 30 on CIFAR-100)."""
    p_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Clean-probability threshold tau: X = {w > p_threshold}."""
    T: Annotated[float, Field(gt=0.0)] = 0.5
    """Sharpening temperature."""
    lambda_u: Annotated[float, Field(ge=0.0)] = 25.0
    """Weight of the unlabeled MSE after the ramp (paper: 0, 25, 50 or 150 by noise level)."""
    rampup_epochs: Annotated[int, Field(ge=0)] = 16
    """Epochs after warm-up over which the unlabeled weight ramps linearly from 0 to ``lambda_u``."""
    mix_alpha: Annotated[float, Field(gt=0.0)] = 4.0
    """MixUp l ~ Beta(alpha, alpha)."""
    conf_penalty: bool = False
    """Add the negative-entropy confidence penalty during warm-up (reference: asymmetric noise)."""
    loss_history: Annotated[int, Field(ge=1)] = 1
    """Epochs of normalised division losses averaged before the GMM (reference: 5 at 90% noise)."""
    warmup_batch_factor: Annotated[int, Field(ge=1)] = 2
    """Warm-up batch size = factor x batch size (reference: 2)."""


SPEC = AlgorithmSpec(
    name="dividemix",
    params=DivideMixParams,
    builder="trainables.dividemix:DivideMix",
    consumes=Target.NOISY_LABEL,
    consumes_when=starred_variant(Target.NOISY_LABEL),
    description="DivideMix (Li et al. 2020): two nets, GMM co-divide, co-refinement/co-guessing, MixMatch.",
)
