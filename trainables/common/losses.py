"""Per-sample loss functions shared by the algorithms.

Every function returns one value per sample, shape (B,), unless its name says otherwise; the caller
reduces (``.mean()`` or :func:`mean_or_zero` when a split may be empty). Inputs are logits unless an
argument is called ``probs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONTRASTIVE_MODES = ("noisy", "supcon")


def mean_or_zero(values: Tensor) -> Tensor:
    """Mean of ``values``, or a zero that keeps the graph when ``values`` is empty (an empty split)."""
    return values.mean() if values.numel() else values.sum()


def partial_ce(logits: Tensor, cand: Tensor) -> Tensor:
    """-log sum_{j in S} p_j (CC, Feng et al. 2020; Co-Reg Eq. 1), computed in log space.  # (B,)"""
    masked = logits.masked_fill(cand <= 0, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)


def neg_entropy(logits: Tensor) -> Tensor:
    """sum_j p_j log p_j (Co-Reg Eq. 2); minimising it keeps predictions away from one-hot.  # (B,)"""
    log_probs = F.log_softmax(logits, dim=1)
    return (log_probs.exp() * log_probs).sum(dim=1)


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum_j t_j log p_j for soft targets t (PRODEN; Co-Reg Eq. 9 on the partial set).  # (B,)"""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def max_candidate_nll(probs: Tensor, cand: Tensor) -> Tensor:
    """-log max_{j in S} p_j: Co-Reg's division loss (Eq. 4).  # (B,)"""
    return -torch.log((probs * cand).amax(dim=1).clamp_min(1e-12))


def squared_error(probs: Tensor, targets: Tensor) -> Tensor:
    """mean_j (p_j - t_j)^2 (Co-Reg Eq. 9-10 on the unlabeled set; mean over classes as DivideMix).  # (B,)"""
    return ((probs - targets) ** 2).mean(dim=1)


def kl_div(log_probs: Tensor, targets: Tensor) -> Tensor:
    """KL(t || q) = sum_j t_j (log t_j - log q_j) with 0 log 0 = 0 (Co-Reg Eq. 10).  # (B,)"""
    return (torch.xlogy(targets, targets) - targets * log_probs).sum(dim=1)


def noisy_supcon_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    labels: Tensor,
    confident: Tensor,
    queue_labels: Tensor,
    queue_confident: Tensor,
    *,
    temperature: float = 0.07,
    mode: str = "noisy",
) -> Tensor:
    """Supervised contrastive loss over a MoCo queue with pseudo-labels (Co-Reg Eq. 12). Scalar.

    Anchors are the queries ``q`` (B, D); the contrast set is [q, k, queue] (2B + Q, D), all rows
    L2-normalised. ``labels``/``confident`` describe the batch, ``queue_*`` the queue entries.

    ``mode="noisy"`` (the reference's ``modified`` selection, after Wang et al. AAAI 2024):
    positives of a confident anchor are the confident samples with its pseudo-label plus its own
    key; an unconfident anchor has only its own key. Samples with the anchor's pseudo-label that are
    not both confident are removed from the denominator, so they are neither pulled nor pushed.
    ``mode="supcon"``: plain SupCon, every same-label sample is a positive and nothing is removed.
    """
    if mode not in CONTRASTIVE_MODES:
        raise ValueError(f"unknown contrastive mode {mode!r}; allowed: {', '.join(CONTRASTIVE_MODES)}")
    batch = q.shape[0]
    contrast = torch.cat([q, k, queue])  # (2B + Q, D)
    contrast_labels = torch.cat([labels, labels, queue_labels])  # (2B + Q,)
    contrast_conf = torch.cat([confident, confident, queue_confident])  # (2B + Q,)
    logits = q @ contrast.T / temperature  # (B, 2B + Q)

    rows = torch.arange(batch, device=q.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, rows] = True
    own_key = torch.zeros_like(is_self)
    own_key[rows, rows + batch] = True
    same = labels[:, None] == contrast_labels[None, :]  # (B, 2B + Q)

    if mode == "supcon":
        positive = same & ~is_self
        in_denominator = ~is_self
    else:
        both_confident = confident[:, None] & contrast_conf[None, :]
        positive = (same & both_confident & ~is_self) | own_key
        in_denominator = ~is_self & ~(same & ~both_confident & ~own_key)

    log_denominator = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator  # (B, 2B + Q)
    positive = positive.float()
    mean_log_prob_pos = (positive * log_prob).sum(dim=1) / positive.sum(dim=1)
    return -mean_log_prob_pos.mean()
