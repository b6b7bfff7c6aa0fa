"""PiCO+: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/pico_plus.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.params.pico import ContrastParams
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class PiCOPlusParams(ContrastParams):
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    """Epochs of PiCO warm-up before selection and disambiguation (reference ``--prot_start``, 5 of 800)."""
    pure_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    """Fraction of samples selected as reliable, by distance to their prototype (``--pure_ratio``)."""
    knn_start: Annotated[int, Field(ge=0)] = 10
    """Epoch from which unreliable anchors take kNN positives (``--knn_start``, 100 of 800 there)."""
    num_neighbors: Annotated[int, Field(ge=1)] = 16
    """k of the kNN positives (``--chosen_neighbors``; 5 for CIFAR-100 in the README)."""
    guess_temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """Temperature of the prototype-based label guess (``--temperature_guess``)."""
    ur_weight: Annotated[float, Field(ge=0.0)] = 0.1
    """Weight of the unreliable losses and of the all-sample SupCon (``--ur_weight``)."""
    cls_weight: Annotated[float, Field(ge=0.0)] = 2.0
    """Weight of the CE on reliable samples next to the MixUp loss (``--cls_weight``)."""
    mix_alpha: Annotated[float, Field(gt=0.0)] = 4.0
    """MixUp lambda ~ Beta(alpha, alpha)."""


SPEC = AlgorithmSpec(
    name="pico_plus",
    params=PiCOPlusParams,
    builder="trainables.pico_plus:PiCOPlus",
    consumes=Target.CAND,
    description="PiCO+ (Wang et al. 2023): PiCO + distance-based reliable set, kNN positives, prototype guess, MixUp.",
)
