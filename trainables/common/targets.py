"""Operations on label distributions: restriction to a candidate set, sharpening, alignment."""

from __future__ import annotations

import torch
from torch import Tensor


def restrict_to_candidates(probs: Tensor, cand: Tensor) -> Tensor:
    """p restricted to S and renormalised (PRODEN's confidence update; Co-Reg Eq. 5).  # (B, C)

    A row whose mass on S is zero (possible only with hand-made inputs) becomes uniform on S.
    """
    masked = probs * cand
    mass = masked.sum(dim=1, keepdim=True)
    uniform_on_s = cand / cand.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(mass > 0, masked / mass.clamp_min(1e-12), uniform_on_s)


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T) renormalised (MixMatch; Co-Reg Eq. 8).  # (B, C)"""
    powered = probs ** (1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def distribution_alignment(probs: Tensor, mean_probs: Tensor, prior: Tensor | None = None) -> Tensor:
    """ReMixMatch distribution alignment: p * prior / mean(p), renormalised.  # (B, C)

    ``mean_probs`` (C,) is the model's average prediction over the training set; ``prior`` (C,)
    defaults to uniform (Co-Reg's reference code, ``--uniform_prior 1``).
    """
    aligned = probs / mean_probs.clamp_min(1e-12)
    if prior is not None:
        aligned = aligned * prior
    return aligned / aligned.sum(dim=1, keepdim=True)
