"""CC: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/cc.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class CCParams:
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the paper does."""


SPEC = AlgorithmSpec(
    name="cc",
    params=CCParams,
    builder="trainables.cc:CC",
    consumes=Target.CAND,
    description="CC (Feng et al. 2020): -log of the predicted probability mass on the candidate set.",
)
