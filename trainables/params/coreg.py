"""Co-Reg: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/coreg.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class CoRegParams:
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    """Warm-up epochs (Eq. 1-3). The paper uses 20-100 of 100-800; grids set it relative to ``training.epochs``."""
    warmup_steps: Annotated[int, Field(ge=0)] = 3920
    """Lengthen the warm-up to at least this many optimiser steps per net where the budget allows
    (deviation 15; 3920: the paper's shortest warm-up, 20 CIFAR-10 epochs at batch 256); 0: exactly
    ``warmup_epochs``, as the paper."""
    max_warmup_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 2 / 3
    """The lengthened warm-up takes at most this fraction of ``training.epochs``."""
    neg_entropy_weight: Annotated[float, Field(ge=0.0)] = 1.0
    """Negative-entropy weight of the warm-up (Eq. 3: 1; with large S and short warm-ups, less disambiguates)."""
    tau_div: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Clean-probability threshold: P = {w > tau_div} (reference ``--p_threshold``)."""
    T: Annotated[float, Field(gt=0.0)] = 0.5
    """Sharpening temperature (Eq. 8)."""
    num_weak_views: Annotated[int, Field(ge=1)] = 2
    """K, weak views averaged for the pseudo-labels (Eq. 6-7)."""
    lambda_u: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of the MSE on U (Eq. 9, after the ramp; Eq. 10 without it)."""
    rampup_epochs: Annotated[int, Field(ge=0)] = 16
    """Epochs after warm-up over which the Eq. 9 U weight ramps linearly from 0 to ``lambda_u``."""
    mix_alpha: Annotated[float, Field(gt=0.0)] = 4.0
    """MixUp lambda ~ Beta(alpha, alpha) (Eq. 14)."""
    beta1: Annotated[float, Field(ge=0.0)] = 0.1
    """Weight of the prototypical similarity alignment (Eq. 13)."""
    beta2: Annotated[float, Field(ge=0.0)] = 0.1
    """Weight of the noisy supervised contrastive loss (Eq. 13)."""
    proj_dim: Annotated[int, Field(ge=1)] = 128
    """Dimension of the L2-normalised projection (prototypes and contrastive keys)."""
    proto_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """gamma, EMA momentum of the prototypes (Eq. 11)."""
    proto_temperature: Annotated[float, Field(gt=0.0)] = 0.3
    """Temperature of the prototype similarity softmax (reference ``--tau_proto``)."""
    moco_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """Momentum of the key networks."""
    queue_size: Annotated[int, Field(ge=1)] = 8192
    """Length of each net's MoCo queue (may exceed the number of samples)."""
    cont_temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """T'', temperature of the contrastive loss (Eq. 12)."""
    contrastive_start: Annotated[int, Field(ge=0)] = 10
    """Epochs after warm-up before the beta1 and beta2 terms enter the loss."""
    loss_history: Annotated[int, Field(ge=1)] = 5
    """Epochs of division losses averaged before the GMM."""
    distribution_alignment: bool = True
    """Align predictions to a uniform prior before the division loss (reference ``--perform_da``)."""
    balanced_division: bool = True
    """P taken class by class, an equal quota per guessed class (deviation 14); False: the paper's
    P = {w > tau_div}."""
    co_pseudo_label: bool = True
    """Each net trains on its peer's split and predictions; False: on its own (ablation)."""
    contrastive: Literal["noisy", "supcon", "off"] = "noisy"
    """Contrastive loss of Eq. 12: noisy selection of positives, plain SupCon, or none (ablations)."""
    prototypes: bool = True
    """Prototypical similarity alignment (Eq. 10-11); False is the ablation."""
    use_unlabeled: bool = True
    """Train on the unlabeled split U; False drops it from every loss (ablation)."""
    reference_warmup: bool = False
    """Warm up on strong views with twice the batch size, as the reference code does."""
    reset_key_each_epoch: bool = True
    """Re-copy each key net from its net at every epoch start, as the reference code does (deviation 10)."""
    restart_keys_after_warmup: bool = True
    """Without the per-epoch reset: copy each key net from its net when the warm-up ends; False: from build time."""
    cosine_period: Annotated[int, Field(ge=1)] | None = None
    """Cosine period in epochs with floor lr * 1e-3 (reference: 800); None: ``training.epochs``, floor 0."""


SPEC = AlgorithmSpec(
    name="coreg",
    params=CoRegParams,
    builder="trainables.coreg:CoReg",
    consumes=Target.CAND,
    ablations={"no_co_pseudo_label": {"co_pseudo_label": False}, "supcon": {"contrastive": "supcon"},
               "no_prototypes": {"prototypes": False}, "no_unlabeled": {"use_unlabeled": False},
               "no_noisy_contrastive": {"contrastive": "off"}},  # fmt: skip
    description="Co-Reg (Wang et al. 2025): two nets, co-pseudo-labelling, prototype alignment, noisy contrastive.",
)
