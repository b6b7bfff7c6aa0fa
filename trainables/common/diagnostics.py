"""Label-free collapse diagnostics, logged per epoch as ``diag/*`` (no label enters them).

A representation collapse shows in the charts before it shows in the accuracy: the projector's
raw output norm grows, the embeddings of a fixed probe batch turn parallel (mean pairwise cosine
-> 1), the prototypes become identical, the key net drifts away from the query net, the queue's
pseudo-labels and the predictions pile onto a few classes. :func:`collapse_reason` turns the last
epoch's signals into the trial's ``collapse`` tag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.common.nets import Net

PROBE_SIZE = 256
"""Training inputs (plain view, the same ones every epoch) the diagnostics are computed on."""
PREDICTION_ENTROPY_FLOOR = 0.5
"""Normalised entropy of the predicted-class histogram below which predictions count as collapsed
(0.5: the predictions hold about sqrt(C) classes' worth of entropy, e.g. 3 of 10)."""
EMBEDDING_COSINE_CEILING = 0.95
"""Mean pairwise cosine of the probe embeddings above which the embedding counts as collapsed."""


def mean_pairwise_cosine(z: Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of ``z`` (B, D)."""
    n = z.shape[0]
    if n < 2:
        return float("nan")
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def class_entropy(labels: Tensor, num_classes: int) -> float:
    """Entropy of the class histogram of ``labels`` (M,), divided by log C: 1 = uniform, 0 = one class."""
    if labels.numel() == 0 or num_classes < 2:
        return float("nan")
    p = torch.bincount(labels.long().flatten(), minlength=num_classes).float()
    p = p[p > 0] / p.sum()
    return (-(p * p.log()).sum() / math.log(num_classes)).item()


@torch.no_grad()
def embedding_diagnostics(net: Net, probe: Tensor, key_net: Net | None = None, prefix: str = "") -> dict[str, float]:
    """``embedding_norm`` (mean raw projector output norm, before the L2 normalisation),
    ``embedding_cosine`` (mean pairwise cosine) and, with a key net, ``key_query_distance``
    (mean ||k - q|| of the normalised embeddings of the same inputs), in eval mode."""
    net.eval()
    raw = net.projector(net.encoder(probe))  # (B, D)
    out = {f"embedding_norm{prefix}": raw.norm(dim=1).mean().item(), f"embedding_cosine{prefix}": mean_pairwise_cosine(raw)}
    if key_net is not None:
        key_net.eval()
        _, k = key_net.forward_with_embedding(probe)
        out[f"key_query_distance{prefix}"] = (k - F.normalize(raw, dim=1)).norm(dim=1).mean().item()
    return out


def prototype_cosine(prototypes: Tensor) -> float:
    """Mean pairwise cosine of the prototypes that have been set (non-zero rows); nan before any."""
    return mean_pairwise_cosine(prototypes[prototypes.norm(dim=1) > 0])


def collapse_reason(metrics: dict[str, float]) -> str:
    """``"predictions"``, ``"embedding"`` (both: joined by ``+``) or ``"none"`` from one epoch's
    ``diag/*`` metrics: the label-free ``collapse`` tag of a trial."""
    reasons = []
    if metrics.get("diag/prediction_entropy", 1.0) < PREDICTION_ENTROPY_FLOOR:
        reasons.append("predictions")
    cosines = [v for k, v in metrics.items() if k.startswith("diag/embedding_cosine") and not math.isnan(v)]
    if cosines and max(cosines) > EMBEDDING_COSINE_CEILING:
        reasons.append("embedding")
    return "+".join(reasons) or "none"


@torch.no_grad()
def contrastive_diagnostics(net: Net, key_net: Net, queue_labels: Tensor, probe: Tensor, num_classes: int, prefix: str = "") -> dict[str, float]:
    """:func:`embedding_diagnostics` with the key net, and ``queue_label_entropy`` of the queue's pseudo-labels."""
    return {**embedding_diagnostics(net, probe, key_net, prefix), f"queue_label_entropy{prefix}": class_entropy(queue_labels, num_classes)}


@torch.no_grad()
def pair_diagnostics(nets, key_nets, queues, prototypes: Tensor, probe: Tensor) -> dict[str, float]:
    """:func:`contrastive_diagnostics` of each of two nets (suffixes ``_a``, ``_b``) with its key net
    and queue, and the shared prototypes' ``prototype_cosine`` (Co-Reg)."""
    out, c = {"prototype_cosine": prototype_cosine(prototypes)}, prototypes.shape[0]
    for net, key_net, queue, name in zip(nets, key_nets, queues, ("a", "b")):
        out.update(contrastive_diagnostics(net, key_net, queue.contents()[1], probe, c, prefix=f"_{name}"))
    return out
