"""IRNet: iterative refinement of noisy candidate sets.

Paper: Z. Lian, M. Xu, L. Chen, L. Sun, B. Liu, L. Feng, J. Tao, "IRNet: Iterative Refinement
Network for Noisy Partial Label Learning", arXiv:2211.04774 (TPAMI 2025). Reference code:
github.com/zeroQiaoba/IRNet (``irnet/train_merge.py: train``, ``irnet/utils/utils_loss.py:
partial_loss``, ``irnet/utils/utils_algo.py: whether_start_correct``, ``irnet/pico.py``).

IRNet is a plug-in on a PLL learner that keeps the candidate sets S as per-sample state and
purifies them. The base learner here is PiCO's classifier branch: each sample has a confidence
``conf`` over S, moved every batch towards the one-hot of the predicted candidate with a moving
average whose momentum goes from ``conf_ema_start`` to ``conf_ema_end`` over training; the network
minimises the symmetric cross-entropy ce_weight * CE(conf, p) + rce_weight * CE(p, conf).
After a warm-up, every batch runs the two modules of the paper on K views of each sample:

1. Noisy sample detection: the sample is noisy when, in every view v,
   max_{j not in S} p_vj > max_{j in S} p_vj + margin, and the non-candidate argmax is the same
   label y' in every view (one view failing is enough to leave the sample alone).
2. Label correction: y' joins S; its confidence is set to p_0y' (the training view's probability)
   and the row of ``conf`` is renormalised. Detection runs again at every later batch that sees the
   sample: these are the rounds of the iterative refinement.

Implementation details / deviations:
1. Correction start. The reference picks the start epoch from the test-accuracy curve
   (``--correct_auto``: smoothed test accuracy stops rising); that uses test labels for a training
   decision, so here it comes from the training side only: ``start="epoch"`` starts at
   ``warmup_epochs``; ``start="plateau"`` waits, from ``warmup_epochs`` on, until the mean
   training loss of the last ``plateau_window`` epochs is less than ``plateau_tol`` (relative)
   below that of the window before. The start is decided once and kept.
2. Detection and correction use the classifier's softmax (the reference's ``--correct_type
   classify``); the reference's README runs use the prototype-based ``cluster`` output of PiCO,
   whose flat probabilities explain its tiny margins (0.002-0.02). The default margin 0.2 is the
   reference's argparse default. The margin is constant (the README ranges have start = end).
3. Views (reference ``--augmentation_type case3``, its default): the training weak view and one
   more weak view, i.e. ``detect_views=2``; more views or strong ones are options. Extra views go
   through the network in training mode without gradients, before the optimiser step, and only
   once correction has started.
4. Base learner: the reference runs full PiCO (MoCo contrastive loss, prototypes). Only the
   classifier branch is kept (the reference's ``--proto_type classify``): no contrastive loss, and
   the confidence follows the classifier. The confidence is updated before the loss of the batch,
   as in the reference. Loss weights: the README uses SCE with alpha 6, beta 1 at lr 0.01; here the
   CE weight is 1 and the reverse-CE weight 1/6 (same ratio; lr 0.05 * 1 ~ lr 0.01 * 6).
5. Correction update of ``conf`` is the reference's ``--correct_update case3``. The reference can
   also drop the least likely candidate of a corrected sample (``--correct_deletion``, off by
   default): ``remove_least=True``. Revealed few-shot samples are never corrected.
6. ``state_dict`` holds the corrected candidate sets ``cand``, ``conf``, the ``corrected`` flags,
   the per-epoch training losses and the start epoch. ``pseudo_labels()`` is ``conf`` (mass on the
   added labels included); ``clean_mask()`` is the samples never detected as noisy.
7. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch,
   ``TrainSettings``); the reference uses SGD lr 0.01, weight decay 1e-3, cosine to lr * 1e-3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.confidence import CandidateConfidence
from trainables.common.losses import soft_ce
from trainables.common.metrics import MeanMeter
from trainables.common.pico import disambiguate, phi_at
from trainables.common.single_net import SingleNet
from trainables.params.irnet import IRNetParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)

RCE_LOG_FLOOR = 1e-4
"""Reverse CE takes log(conf) with conf clamped here (reference ``SCE``), so zeros cost log(1e-4)."""


def detect_noisy(probs: Tensor, cand: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """IRNet's noisy sample detection on V views. Returns (noisy (B,) bool, new label (B,) long).

    ``probs`` (V, B, C): the best non-candidate must beat the best candidate by ``margin`` in every
    view, and be the same label in every view.
    """
    best_in = (probs * cand).amax(dim=2)  # (V, B)
    best_out, label_out = (probs * (1.0 - cand)).max(dim=2)  # (V, B)
    beats = (best_out > best_in + margin).all(dim=0)
    agree = (label_out == label_out[0]).all(dim=0)
    return beats & agree, label_out[0]


class IRNet:
    def __init__(self, params: IRNetParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.net, self.batch_size = self.model.net, self.model.batch_size
        self.epochs = ctx.train.epochs
        n, c = ctx.num_samples, ctx.num_classes
        self.cand = torch.ones(n, c, device=ctx.device)
        """(N, C) the candidate sets being refined; copied from the data by the first epoch."""
        self.conf = CandidateConfidence(n, c, ctx.device)
        """(N, C) confidences on the current S."""
        self.corrected = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        """(N,) samples detected as noisy at least once (their S has grown)."""
        self.losses: list[float] = []
        """Mean training loss of every finished epoch (the plateau signal)."""
        self.correct_from = -1
        """Epoch from which correction runs; -1 until it has started."""

    def _plateaued(self) -> bool:
        w = self.params.plateau_window
        if len(self.losses) < 2 * w:
            return False
        before, recent = sum(self.losses[-2 * w : -w]) / w, sum(self.losses[-w:]) / w
        return before - recent < self.params.plateau_tol * abs(before)

    def correcting(self, epoch: int) -> bool:
        if self.correct_from < 0 and self.params.correct and epoch >= self.params.warmup_epochs:
            if self.params.start == "epoch" or self._plateaued():
                self.correct_from = epoch
        return self.correct_from >= 0

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        if self.conf.start(data.cand):
            self.cand.copy_(data.cand)
        self.net.train()
        correcting = self.correcting(epoch)
        phi = phi_at(epoch, self.epochs, self.params.conf_ema_start, self.params.conf_ema_end)
        extra = data.views.weak if self.params.extra_view == "weak" else data.views.strong
        meter, fixed = MeanMeter(), 0
        for idx in train_batches(data, self.batch_size):
            x, cand = data.x[idx], self.cand[idx]
            logits = self.net(data.views.weak(x))  # (B, C)
            probs = F.softmax(logits.detach(), dim=1)

            # PiCO-style disambiguation on the current S, before the loss (reference order)
            conf = disambiguate(self.conf[idx], probs, cand, phi)
            self.conf[idx] = conf
            rce = -(F.softmax(logits, dim=1) * conf.clamp_min(RCE_LOG_FLOOR).log()).sum(dim=1)
            loss = (self.params.ce_weight * soft_ce(logits, conf) + self.params.rce_weight * rce).mean()

            views = [probs]
            if correcting:
                with torch.no_grad():
                    views += [F.softmax(self.net(extra(x)), dim=1) for _ in range(self.params.detect_views - 1)]

            self.model.step(loss)

            if correcting:
                fixed += self.correct(idx, torch.stack(views), data.trusted[idx])
            meter.add(loss=loss)
        lr = self.model.end_epoch()
        self.losses.append(meter.means().get("train/loss", 0.0))
        return {
            "train/loss": self.losses[-1],
            "train/corrected": float(fixed),
            "train/cand_size": self.cand.sum(dim=1).mean().item(),
            "train/lr": lr,
        }

    @torch.no_grad()
    def correct(self, idx: Tensor, probs: Tensor, trusted: Tensor) -> int:
        """Detection + correction on a batch; ``probs`` (V, B, C), view 0 the training view. Returns #corrected."""
        noisy, label = detect_noisy(probs, self.cand[idx], self.params.margin)
        noisy &= ~trusted
        rows, label, p0 = idx[noisy], label[noisy], probs[0][noisy]  # p0: (n, C)
        if len(rows) == 0:
            return 0
        conf = self.conf[rows]
        if self.params.remove_least:
            least = p0.masked_fill(self.cand[rows] <= 0, float("inf")).argmin(dim=1)
            self.cand[rows, least] = 0.0
            conf[torch.arange(len(rows)), least] = 0.0
        self.cand[rows, label] = 1.0
        conf[torch.arange(len(rows)), label] = p0.gather(1, label[:, None]).squeeze(1)
        self.conf[rows] = conf / conf.sum(dim=1, keepdim=True)
        self.corrected[rows] = True
        return len(rows)

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.table.clone()

    def clean_mask(self) -> Tensor | None:
        return ~self.corrected

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.model.state_dict(),
            **self.conf.state_dict(),
            "cand": self.cand.clone(),
            "corrected": self.corrected.clone(),
            "losses": list(self.losses),
            "correct_from": self.correct_from,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.load_state_dict(state)
        self.cand.copy_(state["cand"])
        self.corrected.copy_(state["corrected"])
        self.losses = [float(v) for v in state["losses"]]
        self.correct_from = int(state["correct_from"])
