"""PiCO's pieces (Wang et al., ICLR 2022), shared by composition by ``pico``, ``pico_plus`` and ``alim``.

- :class:`ContrastiveClassifier`: a ``SingleNet`` with a projection head (network, optimiser,
  schedule), its momentum key copy, a MoCo queue of keys with pseudo-labels and the class
  prototypes. One query forward (classifier logits and embedding) and one key forward per batch,
  as in the reference ``model.py``.
- Prototype-based label disambiguation: the pseudo-label moves by a moving average towards the
  one-hot of the candidate whose prototype is closest to the embedding (PiCO Eq. 7-8).
- Contrastive losses over [queries, keys, queue]: MoCo's InfoNCE (the warm-up of the reference
  code) and SupCon with an arbitrary positive mask (PiCO Eq. 2-3 with pseudo-label positives;
  PiCO+ with reliable / kNN positives).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext
from trainables.common.diagnostics import contrastive_diagnostics, prototype_cosine
from trainables.common.moco import KeyQueue, copy_into_key_net, make_key_net, momentum_update
from trainables.common.prototypes import ema_update_prototypes, prototype_logits
from trainables.common.single_net import SingleNet


class ContrastiveClassifier:
    """PiCO's network: query net with its optimiser (a ``SingleNet``), momentum key net, key queue and prototypes."""

    def __init__(self, ctx: BuildContext, *, proj_dim: int, queue_size: int, moco_momentum: float):
        self.base = SingleNet(ctx, proj_dim=proj_dim)
        self.net = self.base.net
        self.key_net = make_key_net(self.net)
        self.queue = KeyQueue(queue_size, proj_dim).to(ctx.device)
        self.prototypes = torch.zeros(ctx.num_classes, proj_dim, device=ctx.device)  # (C, D)
        self.moco_momentum = moco_momentum

    @torch.no_grad()
    def restart_contrast(self) -> None:
        """Start the contrastive part afresh from the query net: key net <- query net, an empty
        queue, zero prototypes. Called once, when the warm-up (MoCo InfoNCE on uniform pseudo-
        labels) hands over to SupCon and prototype disambiguation.

        Why: after a short warm-up the key net is still mostly its random initialisation (momentum
        0.99-0.999 over a few hundred steps) and the queue holds its keys. The first SupCon
        gradients against that contrast set are large and all point the same way; one step moves
        the shared projector further than the embeddings' norm, the queries collapse onto one
        direction (pairwise cosine ~1), the loss sits at log(queue size), the prototypes become
        identical and disambiguation turns to noise. Resetting all three together avoids it
        (measured on digits, README).
        """
        copy_into_key_net(self.key_net, self.net)
        self.queue.clear()
        self.prototypes.zero_()

    def train_mode(self) -> None:
        """Query and key nets in training mode (BatchNorm on batch statistics), at every epoch start."""
        self.net.train()
        self.key_net.train()

    def forward(self, x_q: Tensor, x_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits (B, C), query embedding q (B, D), key embedding k (B, D), no gradient)."""
        logits, q = self.net.forward_with_embedding(x_q)
        with torch.no_grad():
            momentum_update(self.key_net, self.net, self.moco_momentum)
            _, k = self.key_net.forward_with_embedding(x_k)
        return logits, q, k

    @torch.no_grad()
    def prototype_scores(self, q: Tensor, temperature: float) -> Tensor:
        """softmax(q . o_c / tau) over the classes, with the prototypes before this batch's update.  # (B, C)"""
        return F.softmax(prototype_logits(q.detach(), self.prototypes, temperature), dim=1)

    def update_prototypes(self, q: Tensor, labels: Tensor, momentum: float) -> None:
        """o_c <- normalise(m o_c + (1 - m) q_i) for every q_i pseudo-labelled c (PiCO Eq. 8)."""
        if len(labels):
            self.prototypes = ema_update_prototypes(self.prototypes, q.detach(), labels, momentum)

    def enqueue_all(self, k: Tensor, labels: Tensor) -> None:
        """Queue this batch's keys with their pseudo-labels, all flagged confident. Call it after
        :meth:`step`: the queued keys are in the graph of the step's loss."""
        self.queue.enqueue(k, labels, torch.ones_like(labels, dtype=torch.bool))

    def step(self, loss: Tensor) -> None:
        self.base.step(loss)

    def end_epoch(self) -> float:
        """Advance the per-epoch schedule; returns the learning rate the epoch used."""
        return self.base.end_epoch()

    def predict(self, x: Tensor) -> Tensor:
        return self.base.predict(x)

    @torch.no_grad()
    def diagnostics(self, probe: Tensor) -> dict[str, float]:
        """Label-free collapse signals (``api.Diagnosed``): embedding norm and cosine, key-query
        distance, the prototypes' pairwise cosine and the queue's pseudo-label entropy."""
        queue_labels = self.queue.contents()[1]
        signals = contrastive_diagnostics(self.net, self.key_net, queue_labels, probe, self.prototypes.shape[0])
        return {**signals, "prototype_cosine": prototype_cosine(self.prototypes)}

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base.state_dict(),
            "key_net": self.key_net.state_dict(),
            "queue": self.queue.state_dict(),
            "prototypes": self.prototypes.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)
        self.key_net.load_state_dict(state["key_net"])
        self.queue.load_state_dict(state["queue"])
        self.prototypes = state["prototypes"].clone().to(self.prototypes.device)


# -- label disambiguation ----------------------------------------------------------------------


def at_switch(epoch: int, warmup_epochs: int, restart: bool) -> bool:
    """True at the first epoch after a non-empty warm-up when the contrast set is to be restarted."""
    return restart and warmup_epochs > 0 and epoch == warmup_epochs


def phi_at(epoch: int, epochs: int, start: float, end: float) -> float:
    """Moving-average coefficient phi, ramped linearly from ``start`` to ``end`` over training (PiCO Sec. 5)."""
    return start + (end - start) * epoch / max(epochs, 1)


def candidate_argmax(scores: Tensor, cand: Tensor) -> Tensor:
    """argmax_{j in S} scores_j: the candidate with the highest score.  # (B,)"""
    return scores.masked_fill(cand <= 0, float("-inf")).argmax(dim=1)


def moving_average(conf: Tensor, target: Tensor, phi: float) -> Tensor:
    """phi * conf + (1 - phi) * target (PiCO Eq. 7).  # (B, C)"""
    return phi * conf + (1.0 - phi) * target


def disambiguate(conf: Tensor, scores: Tensor, cand: Tensor, phi: float) -> Tensor:
    """PiCO's update: conf moves by (1 - phi) towards onehot(argmax_{j in S} prototype scores).  # (B, C)"""
    onehot = F.one_hot(candidate_argmax(scores, cand), cand.shape[1]).to(conf.dtype)
    return moving_average(conf, onehot, phi)


# -- contrastive losses --------------------------------------------------------------------------


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of MoCo: the own key against the queue keys (reference warm-up, ``mask=None``).  # (B,)"""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    logits = torch.cat([l_pos, q @ queue.T], dim=1) / temperature  # (B, 1 + Q)
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def contrast_set(
    q: Tensor, k: Tensor, labels: Tensor, queue_keys: Tensor, queue_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """[q, k, queue] (2B + Q, D) and their pseudo-labels (2B + Q,): what each anchor q_i is contrasted with."""
    return torch.cat([q, k, queue_keys]), torch.cat([labels, labels, queue_labels])


def own_key_mask(batch: int, contrast_size: int, device: torch.device) -> Tensor:
    """(B, 2B + Q) bool, True at each anchor's own key (column B + i of [q, k, queue])."""
    mask = torch.zeros(batch, contrast_size, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    mask[rows, rows + batch] = True
    return mask


def masked_supcon_loss(q: Tensor, contrast: Tensor, positive: Tensor, temperature: float) -> Tensor:
    """SupCon with a given positive mask (PiCO Eq. 3).  # (B,)

    Anchors ``q`` (B, D) are the first B rows of ``contrast`` [q, k, queue] (2B + Q, D); each
    anchor's own row is excluded from the denominator and from its positives (the reference's
    ``logits_mask``). ``positive`` (B, 2B + Q) must leave every anchor at least one positive.
    """
    batch = q.shape[0]
    logits = q @ contrast.T / temperature  # (B, 2B + Q)
    rows = torch.arange(batch, device=q.device)
    not_self = torch.ones_like(positive)
    not_self[rows, rows] = False
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positive = (positive & not_self).to(log_prob.dtype)
    return -(positive * log_prob).sum(dim=1) / positive.sum(dim=1)


def same_label_mask(labels: Tensor, contrast_labels: Tensor) -> Tensor:
    """(B, M) bool: contrast entries that share the anchor's pseudo-label (PiCO's positive set)."""
    return labels[:, None] == contrast_labels[None, :]
