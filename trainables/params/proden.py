"""PRODEN: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/proden.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class PRODENParams:
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the reference does."""


SPEC = AlgorithmSpec(
    name="proden",
    params=PRODENParams,
    builder="trainables.proden:PRODEN",
    consumes=Target.CAND,
    description="PRODEN (Lv et al. 2020): confidence-weighted CE, confidences re-estimated per batch on S.",
)
