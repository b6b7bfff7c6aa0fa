"""Operations on label distributions: restriction to a candidate set, sharpening, alignment, co-refinement."""

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


def co_refine(w: Tensor, labels: Tensor, own_probs: Tensor, temperature: float) -> Tensor:
    """sharpen(w y + (1 - w) p_own, T): DivideMix's co-refinement on X, Co-Reg Eq. 7-8 on P.  # (B, C)

    ``w`` (B,) is the clean probability from the peer's division, ``labels`` (B, C) the label
    distribution to trust that much (the noisy label; in Co-Reg the peer's prediction on S).
    """
    return sharpen(w[:, None] * labels + (1.0 - w[:, None]) * own_probs, temperature)


def co_guess(probs_per_view: list[Tensor], temperature: float) -> Tensor:
    """sharpen(mean of the given predictions, T): DivideMix's co-guessing on U, Co-Reg Eq. 6-8 on U.  # (B, C)"""
    return sharpen(torch.stack(probs_per_view).mean(dim=0), temperature)
