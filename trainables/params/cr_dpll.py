"""CR-DPLL: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/cr_dpll.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class CRDPLLParams:
    lam: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of the consistency term after the ramp (the reference's ``--lam``, default 1)."""
    rampup_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """T' as a fraction of ``training.epochs``: the weight grows linearly from 0 over these epochs."""


SPEC = AlgorithmSpec(
    name="cr_dpll",
    params=CRDPLLParams,
    builder="trainables.cr_dpll:CRDPLL",
    consumes=Target.CAND,
    description="CR-DPLL (Wu et al. 2022): KL of 3 views to a geometric-mean confidence on S + non-candidate loss.",
)
