"""ALIM-Onehot and ALIM-Scale: hyperparameters and registry entry (the algorithm, its paper and its deviations:
``trainables/alim.py``). Torch-free, so a grid is validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class ALIMParams:
    """ALIM-Onehot's settings, shared by ALIM-Scale (the module docstring documents the defaults)."""

    lambda_mode: Literal["adaptive", "fixed"] = "adaptive"
    """``adaptive``: eta-quantile of the ratios (poster Eq. 6); ``fixed``: ``lam`` from ``lambda_start`` on."""
    lam: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """lambda of the fixed mode (0 trusts S, 1 ignores it)."""
    lambda_start: Annotated[int, Field(ge=0)] = 5
    """e0: epoch from which lambda is adjusted (reference ``--piror_start``)."""
    eta_hint: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """A user-given noise rate for the adaptive mode; None estimates it by a GMM on the log-ratios."""
    eta_scale: Annotated[float, Field(ge=0.0)] = 1.0
    """Multiplies the estimated eta (adaptive mode without ``eta_hint``)."""
    cap_lambda: bool = True
    """Cap the adaptive lambda at 1 (reference ``--max1``, set in every published run)."""
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    """PiCO-style warm-up epochs (uniform conf, MoCo); the reference has none."""
    mixup_weight: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of the MixUp loss (reference ``--loss_weight_mixup``; 0 turns it off)."""
    mix_alpha: Annotated[float, Field(gt=0.0)] = 4.0
    """MixUp lambda ~ Beta(alpha, alpha) (reference ``--alpha``)."""
    cont_weight: Annotated[float, Field(ge=0.0)] = 0.5
    """Weight of the SupCon loss (reference ``--loss_weight``)."""
    phi_start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    """Moving-average coefficient of the pseudo-labels at the first epoch."""
    phi_end: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8
    """... ramped linearly to this value at the last epoch."""
    proto_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    """EMA momentum of the prototypes."""
    proto_temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """Temperature of the prototype similarity P (reference ``--vMF``)."""
    proj_dim: Annotated[int, Field(ge=1)] = 128
    """Dimension of the L2-normalised projection."""
    moco_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """Momentum of the key network."""
    queue_size: Annotated[int, Field(ge=1)] = 8192
    """Length of the MoCo key queue."""
    temperature: Annotated[float, Field(gt=0.0)] = 0.07
    """Temperature of the contrastive losses."""
    restart_at_switch: bool = True
    """With a warm-up: restart key net, queue and prototypes from the query net when it ends, as PiCO
    (``pico.py``, deviation 6); False carries them over."""

@dataclass(frozen=True)
class ALIMScaleParams(ALIMParams):
    """ALIM's settings and the power of the Scale normalisation."""

    scale_k: Annotated[float, Field(gt=0.0)] = 1.0
    """K of Scale(z) = z^(1/K) / sum z^(1/K) (reference Case3: 1)."""


ABLATIONS = {"no_mixup": {"mixup_weight": 0.0}, "pico_targets": {"lambda_mode": "fixed", "lam": 0.0}}
ONEHOT_SPEC = AlgorithmSpec(
    name="alim_onehot",
    params=ALIMParams,
    builder="trainables.alim:build_onehot",
    consumes=Target.CAND,
    ablations=dict(ABLATIONS),
    description="ALIM-Onehot (Xu et al. 2023): PiCO with S~ = S + lambda (1 - S), one-hot targets, adaptive lambda.",
)
SCALE_SPEC = AlgorithmSpec(
    name="alim_scale",
    params=ALIMScaleParams,
    builder="trainables.alim:build_scale",
    consumes=Target.CAND,
    ablations=dict(ABLATIONS),
    description="ALIM-Scale (Xu et al. 2023): PiCO with S~ = S + lambda (1 - S), scaled soft targets, adaptive lambda.",
)
SPECS = (ONEHOT_SPEC, SCALE_SPEC)
