"""RC: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/rc.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class RCParams:
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the paper does."""


SPEC = AlgorithmSpec(
    name="rc",
    params=RCParams,
    builder="trainables.rc:RC",
    consumes=Target.CAND,
    description="RC (Feng et al. 2020): confidence-weighted CE, confidences re-estimated per epoch on S.",
)
