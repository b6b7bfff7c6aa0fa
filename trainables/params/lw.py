"""LWS and LWC: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/lw.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class LWParams:
    """The settings of LWS and LWC."""

    beta: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of the non-candidate term (the paper's beta; 0 drops it)."""
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the reference does."""


LWS_SPEC = AlgorithmSpec(
    name="lws",
    params=LWParams,
    builder="trainables.lw:build_lws",
    consumes=Target.CAND,
    description="LWS (Wen et al. 2021): leveraged weighted sigmoid loss on candidates and non-candidates.",
)
LWC_SPEC = AlgorithmSpec(
    name="lwc",
    params=LWParams,
    builder="trainables.lw:build_lwc",
    consumes=Target.CAND,
    description="LWC (Wen et al. 2021): leveraged weighted logistic loss on candidates and non-candidates.",
)
SPECS = (LWS_SPEC, LWC_SPEC)
