"""IRNet: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/irnet.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class IRNetParams:
    correct: bool = True
    """Run detection and correction; False leaves the base PLL learner (the reference's PiCO baseline)."""
    margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    """Detection margin delta on probabilities (reference ``--correct_threshold_range`` default)."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    """No correction before this epoch (0-based); the earliest start with ``start="plateau"``."""
    start: Literal["epoch", "plateau"] = "epoch"
    """Start correcting at ``warmup_epochs`` or, from then on, once the training loss plateaus."""
    plateau_window: Annotated[int, Field(ge=1)] = 3
    """Epochs per window of the plateau test."""
    plateau_tol: Annotated[float, Field(ge=0.0)] = 0.02
    """Relative drop of the windowed mean training loss below which it counts as a plateau."""
    detect_views: Annotated[int, Field(ge=1)] = 2
    """K views that must all agree (the training view plus K - 1 extra views)."""
    extra_view: Literal["weak", "strong"] = "weak"
    """Augmentation of the extra detection views (reference ``case3``: weak)."""
    remove_least: bool = False
    """Also drop the least likely candidate of a corrected sample (reference ``--correct_deletion``)."""
    ce_weight: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of CE(conf, p) in the symmetric cross-entropy."""
    rce_weight: Annotated[float, Field(ge=0.0)] = 1.0 / 6.0
    """Weight of the reverse CE(p, conf) (reference SCE beta / alpha = 1 / 6)."""
    conf_ema_start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    """Confidence moving-average momentum at the first epoch (PiCO's phi range, reference default)."""
    conf_ema_end: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    """Momentum at the last epoch (linear in between)."""


SPEC = AlgorithmSpec(
    name="irnet",
    params=IRNetParams,
    builder="trainables.irnet:IRNet",
    consumes=Target.CAND,
    ablations={"no_correction": {"correct": False}},
    description="IRNet (Lian et al.): PiCO-style PLL that adds a non-candidate to S when all views beat S by a margin.",
)
