"""Unsupervised KD: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/kd.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec, starred_variant


@dataclass(frozen=True)
class KDParams:
    starred: bool = False
    """KD*: distil the template-average probabilities instead of template ``single_template``."""
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    """Distillation temperature T (Hinton et al.); 1 distils the probabilities as they are."""
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views."""


SPEC = AlgorithmSpec(
    name="kd",
    params=KDParams,
    builder="trainables.kd:KD",
    consumes=Target.SOFT_SINGLE,
    consumes_when=starred_variant(Target.SOFT_SINGLE),
    description="Unsupervised KD (Hinton et al. 2015): a student fits the annotator's probabilities (KD*: average).",
)
