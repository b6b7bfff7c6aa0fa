"""PiCO: contrastive label disambiguation for partial label learning.

Paper: H. Wang, R. Xiao, Y. Li, L. Feng, G. Niu, G. Chen, J. Zhao, "PiCO: Contrastive Label
Disambiguation for Partial Label Learning", ICLR 2022 (equation numbers below are its section 3-4).
Reference code: github.com/hbzju/PiCO (``train.py``, ``model.py: PiCO``, ``utils/utils_loss.py``).

Each sample keeps a pseudo-label ``conf`` (N, C), initialised uniform on S. Each batch: a query
view goes through the encoder to the classifier (logits) and the projection head (q); a key view
goes through the momentum key net (k). The pseudo class of a sample is argmax_{j in S} of the
classifier's prediction; it moves that class's prototype (EMA, Eq. 8) and labels q and k in the
queue (:func:`encode_batch`). After the warm-up (``warmup_epochs``, reference ``prot_start``):

1. Disambiguation (Eq. 7): conf <- phi conf + (1 - phi) onehot(argmax_{j in S} of the prototype
   similarity of q), with the prototypes before this batch's update.
2. Loss: L = CE(logits, conf) + ``cont_weight`` * SupCon over [q, k, queue] whose positives share
   the anchor's pseudo class (Eq. 2-3). During the warm-up the classifier trains on the uniform
   conf and the contrastive term is MoCo's InfoNCE (own key vs queue), as in the reference
   (:func:`contrastive_loss`).

:func:`encode_batch` and :func:`contrastive_loss` are the steps ALIM (``alim.py``) composes with its
own pseudo class and target; the network pieces they call live in ``common/pico.py``.

Implementation details / deviations:
1. phi ramps linearly from ``phi_start`` 0.95 to ``phi_end`` 0.8 over ``training.epochs`` (paper
   Sec. 5 and ``--conf_ema_range``); epoch e uses phi(e). The reference sets phi after each epoch,
   so its epoch e uses phi(e - 1) and its very first epoch uses 0.99. Prototype momentum 0.99, key
   momentum 0.999, queue 8192, temperature 0.07, weight 0.5, as in the paper.
2. Query view = weak augmentation, key view = strong (reference loaders: ``images_w`` to the
   query, ``images_s`` to the key); the classifier sees the query view only.
3. ``warmup_epochs`` = 1 (``run.sh`` CIFAR setting; parser default 80 of 800 epochs). In a short
   run set it to 0: on digits (30 epochs, batch 128) the one warm-up epoch costs about 23 points
   (README, "The PiCO family's warm-up in a short run"). The queue starts empty (the reference
   fills it with random keys whose random float labels never match).
4. The CE target is conf after this batch's update, as in the reference (update, then loss).
5. Optimiser and schedule are the project's (``TrainSettings``: SGD + cosine); the reference uses
   SGD lr 0.01, wd 1e-3, cosine over 800 epochs. No DDP batch shuffle (single device; it only
   changes BatchNorm statistics across GPUs).
6. At the warm-up -> SupCon switch the key net is re-copied from the query net, the queue
   emptied and the prototypes zeroed, once (``restart_at_switch``, on by default; False is the
   reference, which carries all three over). After a short warm-up the key net is still ~90% its
   random initialisation and the queue holds its keys; the first SupCon gradients against them
   are ~20x larger and far more coherent than the warm-up's, the shared projector steps past the
   embeddings' norm, the queries collapse onto one direction, the loss sits at log(queue size),
   the prototypes become identical and disambiguation turns to noise. Measured on digits (q 0.3,
   eta 0.3, 30 epochs; README "The PiCO family's warm-up in a short run"): 71.8% -> 95.7%. The
   reference collapses far less there: its queue starts as random keys of small norm that dilute
   the warm-up's, where ours starts empty. :meth:`ContrastiveClassifier.restart_contrast`.
7. ``pseudo_labels()`` = conf; ``clean_mask()`` is None (PiCO trusts S). The reference also logs
   the best test accuracy over epochs; the loop reports the last epoch and a label-free selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.confidence import CandidateConfidence, ConfidenceTableMethod
from trainables.common.losses import soft_ce
from trainables.common.metrics import MeanMeter
from trainables.common.pico import (
    ContrastiveClassifier, at_switch, candidate_argmax, contrast_set, disambiguate, masked_supcon_loss, moco_loss, phi_at, same_label_mask,
)
from trainables.params.pico import PiCOParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


@dataclass
class PiCOBatch:
    """One mini-batch through PiCO's networks, before the loss (what a PiCO-based method builds on)."""

    cand: Tensor  # (B, C)
    x_q: Tensor  # the query (weak) view, also MixUp's input
    logits: Tensor  # (B, C) classifier on the query view
    q: Tensor  # (B, D) query embedding
    k: Tensor  # (B, D) key embedding of the strong view (no gradient)
    labels: Tensor  # (B,) pseudo classes: move the prototypes, label q and k in the queue
    scores: Tensor  # (B, C) prototype similarity softmax(q . o / tau), prototypes before this batch's update


PseudoClass = Callable[[Tensor, Tensor], Tensor]
"""``(probs (B, C), cand (B, C)) -> (B,)`` pseudo classes from the classifier's prediction."""


def encode_batch(
    model: ContrastiveClassifier, data: TrainData, idx: Tensor, *,
    temperature: float, proto_momentum: float, pseudo_class: PseudoClass = candidate_argmax,
) -> PiCOBatch:  # fmt: skip
    """Query and key forward, pseudo classes, prototype scores, then the prototype update (Eq. 8)."""
    x, cand = data.x[idx], data.cand[idx]
    x_q = data.views.weak(x)
    logits, q, k = model.forward(x_q, data.views.strong(x))
    labels = pseudo_class(F.softmax(logits.detach(), dim=1), cand)  # (B,)
    scores = model.prototype_scores(q, temperature)  # (B, C), before the update
    model.update_prototypes(q, labels, proto_momentum)  # Eq. 8
    return PiCOBatch(cand=cand, x_q=x_q, logits=logits, q=q, k=k, labels=labels, scores=scores)


def contrastive_loss(model: ContrastiveClassifier, batch: PiCOBatch, temperature: float, *, supervised: bool) -> Tensor:
    """SupCon over [q, k, queue] with pseudo-label positives (Eq. 2-3), or MoCo's InfoNCE in the warm-up. Scalar."""
    queue_keys, queue_labels, _ = model.queue.contents()
    if not supervised:
        return moco_loss(batch.q, batch.k, queue_keys, temperature).mean()
    contrast, contrast_labels = contrast_set(batch.q, batch.k, batch.labels, queue_keys, queue_labels)  # (2B + Q, D)
    positive = same_label_mask(batch.labels, contrast_labels)
    return masked_supcon_loss(batch.q, contrast, positive, temperature).mean()  # Eq. 3


class PiCO(ConfidenceTableMethod):
    def __init__(self, params: PiCOParams, ctx: BuildContext):
        p = self.params = params
        self.model = ContrastiveClassifier(
            ctx, proj_dim=p.proj_dim, queue_size=p.queue_size, moco_momentum=p.moco_momentum
        )
        self.epochs, self.batch_size = ctx.train.epochs, ctx.train.batch_size
        self.conf = CandidateConfidence(ctx.num_samples, ctx.num_classes, ctx.device)
        """(N, C) pseudo-labels; set uniform on S by the first epoch (the candidate sets come with the data)."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        p, model = self.params, self.model
        self.conf.start(data.cand)
        disambiguating = epoch >= p.warmup_epochs
        if at_switch(epoch, p.warmup_epochs, p.restart_at_switch):
            model.restart_contrast()
        phi = phi_at(epoch, self.epochs, p.phi_start, p.phi_end)
        model.train_mode()
        meter = MeanMeter()
        for idx in train_batches(data, self.batch_size):
            batch = encode_batch(model, data, idx, temperature=p.temperature, proto_momentum=p.proto_momentum)
            if disambiguating:
                self.conf[idx] = disambiguate(self.conf[idx], batch.scores, batch.cand, phi)  # Eq. 7
            loss_cont = contrastive_loss(model, batch, p.temperature, supervised=disambiguating)
            loss_cls = soft_ce(batch.logits, self.conf[idx]).mean()
            loss = loss_cls + p.cont_weight * loss_cont
            model.step(loss)
            model.enqueue_all(batch.k, batch.labels)
            meter.add(loss=loss, loss_cls=loss_cls, loss_cont=loss_cont)
        lr = model.end_epoch()
        return {**meter.means("train/"), "train/phi": phi if disambiguating else 1.0, "train/lr": lr}

    def diagnostics(self, probe: Tensor) -> dict[str, float]:
        return self.model.diagnostics(probe)
