"""PiCO: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/pico.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class ContrastParams:
    """PiCO's contrastive and label-disambiguation hyperparameters, which PiCO+ keeps (reference
    flags in brackets). Each method's params dataclass adds its own fields to these."""

    cont_weight: Annotated[float, Field(ge=0.0)] = 0.5
    """Weight of the contrastive loss (``--loss_weight``; PiCO+: of reliable anchors and during warm-up)."""
    phi_start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    """Moving-average coefficient phi of the pseudo-labels at the first epoch (Eq. 7, ``--conf_ema_range`` start)."""
    phi_end: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    """... ramped linearly to this value at the last epoch (``--conf_ema_range`` end)."""
    proto_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    """gamma, EMA momentum of the prototypes (Eq. 8, ``--proto_m``; PiCO+ moves them with reliable samples only)."""
    proj_dim: Annotated[int, Field(ge=1)] = 128
    """Dimension of the L2-normalised projection (``--low-dim``)."""
    moco_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """Momentum of the key network (``--moco_m``)."""
    queue_size: Annotated[int, Field(ge=1)] = 8192
    """Length of the MoCo key queue (``--moco_queue``; PiCO+ stores each key's reliable flag with it)."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """Temperature of the SupCon and MoCo losses."""
    restart_at_switch: bool = True
    """At the end of the warm-up, re-copy the key net from the query net, empty the queue and zero
    the prototypes once (:meth:`ContrastiveClassifier.restart_contrast`); False: the reference,
    which carries all three over from the warm-up."""


@dataclass(frozen=True)
class PiCOParams(ContrastParams):
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    """Epochs before prototype-based disambiguation and SupCon start (reference ``--prot_start``)."""


SPEC = AlgorithmSpec(
    name="pico",
    params=PiCOParams,
    builder="trainables.pico:PiCO",
    consumes=Target.CAND,
    description="PiCO (Wang et al. 2022): MoCo SupCon with pseudo-label positives, prototype-based disambiguation.",
)
