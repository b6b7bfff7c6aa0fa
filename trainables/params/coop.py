"""CoOp: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/coop.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class CoOpParams:
    n_ctx: Annotated[int, Field(ge=1, le=64)] = 16
    """Number M of learned context vectors (the paper's default 16; ignored with ``ctx_init``)."""
    class_specific: bool = False
    """One context per class (the paper's CSC) instead of one shared by every class."""
    ctx_init: str = ""
    """Initialise the context from this phrase's token embeddings ("a photo of a"); "" draws N(0, 0.02)."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    """Epochs at the constant warm-up learning rate before the schedule (the reference: 1)."""
    warmup_lr: Annotated[float, Field(gt=0.0)] = 1e-5
    """The constant warm-up learning rate (the reference: 1e-5)."""
    augment: bool = True
    """Train on weak views (shift + flip, then CLIP's transform); False: CLIP's plain transform."""


SPEC = AlgorithmSpec(
    name="coop",
    params=CoOpParams,
    builder="trainables.coop:CoOp",
    consumes=Target.CAND,
    needs_clip=True,
    description="CoOp (Zhou et al. 2022): learned prompt context on the annotator's frozen CLIP, from the revealed shots.",
)
