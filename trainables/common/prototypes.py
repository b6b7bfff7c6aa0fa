"""Class prototypes in an embedding space: EMA of member embeddings, then L2-normalised (PiCO, Co-Reg Eq. 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def ema_update_prototypes(prototypes: Tensor, z: Tensor, labels: Tensor, momentum: float) -> Tensor:
    """o_c <- m o_c + (1 - m) z_i for every sample i of class c in batch order, then L2-normalise rows.

    Equal to applying the update one sample at a time (as the reference does in a Python loop),
    but vectorised: the i-th of n_c samples of class c enters with weight (1 - m) m^(n_c - 1 - rank_i)
    and the old prototype with m^(n_c). Returns the new (C, D) table.
    """
    onehot = F.one_hot(labels, prototypes.shape[0]).to(z.dtype)  # (B, C)
    rows = torch.arange(len(labels), device=labels.device)
    later_same_class = (onehot.flip(0).cumsum(0).flip(0) - onehot)[rows, labels]  # (B,)
    weights = (1.0 - momentum) * momentum**later_same_class  # (B,)
    decay = momentum ** onehot.sum(0)  # (C,)
    updated = decay[:, None] * prototypes + onehot.T @ (weights[:, None] * z)
    return F.normalize(updated, dim=1)


def prototype_logits(z: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """Similarity logits z . o_c / tau; softmax of them is Co-Reg's s (Eq. 10).  # (B, C)"""
    return z @ prototypes.detach().T / temperature
