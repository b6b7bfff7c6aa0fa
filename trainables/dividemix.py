"""DivideMix: learning with noisy labels as semi-supervised learning.

Paper: J. Li, R. Socher, S. C. H. Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised
Learning", ICLR 2020. Reference code: github.com/LiJunnan1992/DivideMix (``Train_cifar.py``:
``warmup``, ``eval_train``, ``train``, ``SemiLoss``, ``NegEntropy``; ``dataloader_cifar.py``).
In Co-Reg's Table I it is the noisy single-label baseline: the label is the annotator's argmax of
one template ("a photo of a {}"), or of the template average for DivideMix* (``starred=True``).

Two networks A and B (``common/two_net.TwoNets``). Epochs before ``warmup_epochs`` train each net with
cross-entropy on the noisy labels (plus the confidence penalty sum_j p_j log p_j for asymmetric noise).
Every later epoch:

1. Co-divide: each net scores every sample with its cross-entropy to the noisy label; a
   2-component GMM on the min-max normalised losses gives the clean probability w; the labeled set
   is X = {w > p_threshold}, the rest is the unlabeled set U. Net A trains on B's split, B on A's.
2. Co-refinement on X: y' = w y + (1 - w) (mean of the net's own predictions on 2 weak views),
   sharpened with temperature T. Co-guessing on U: mean of both nets' predictions on 2 weak views,
   sharpened.
3. MixMatch: MixUp (l ~ Beta(alpha, alpha), l = max(l, 1 - l)) over [X1, X2, U1, U2]; CE on the X
   part, MSE on the U part weighted by lambda_u ramped linearly over 16 epochs after warm-up, plus
   the regulariser sum_c pi_c log(pi_c / mean_batch p_c) with the uniform prior pi
   (``train/loss_penalty``).
4. Test prediction: logits_A + logits_B.

Implementation details / deviations:
1. Noisy labels are the rows of ``data.cand`` (one-hot, ``api.TrainData``); a row with several
   ones (only the contract test's candidate sets) is used as a uniform target over them.
2. Warm-up batches are ``warmup_batch_factor`` (2) times the batch size, as the reference's warm-up
   loader; weak views throughout (the reference has no strong augmentation).
3. Division losses come from the plain view in eval mode (reference ``eval_train``, test
   transform). ``loss_history`` > 1 averages the last epochs' normalised losses, which the
   reference does only at 90% noise. GMM: max_iter 10, tol 1e-2, reg_covar 5e-4, seeded.
4. Few-shot trusted samples get w = 1 and are always in X.
5. Label guessing uses the net being trained in train mode and the peer in eval mode, U before X
   (reference ``train``). The ramp is per iteration over ceil(|X| / B) iterations per epoch (the
   reference counts |X| // B + 1).
6. Optimiser and schedule are the shared SGD + cosine (``TrainSettings``); the reference uses lr
   0.02, divided by 10 at epoch 150 of 300.
7. ``lambda_u`` defaults to the reference's 25; the paper uses 0 for 20% symmetric noise on
   CIFAR-10 and 150 for 80-90%: the search space covers these values.
8. ``pseudo_labels()`` is the mean over both nets of each sample's latest training target (the
   noisy label during warm-up); ``clean_mask()`` is the union of both nets' X (share of X per net:
   ``train/labeled_fraction_a``, ``_b``, the same keys as Co-Reg's P).
9. MixUp's lambda and permutation come from ``data.generator``; networks are initialised under
   ``ctx.seed``. The reference seeds only the global RNGs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import split_batches
from trainables.common.gmm import clean_set, divide, division_pass
from trainables.common.losses import neg_entropy, soft_ce
from trainables.common.metrics import MeanMeter
from trainables.common.mixup import mixmatch, mixmatch_losses
from trainables.common.schedules import linear_ramp
from trainables.common.targets import co_guess, co_refine
from trainables.common.two_net import CoTrainedPair, TwoNets, labeled_fraction
from trainables.params.dividemix import DivideMixParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


def noisy_targets(cand: Tensor) -> Tensor:
    """The noisy label as a distribution: the one-hot row itself (uniform over a multi-label row).  # (N, C)"""
    return cand / cand.sum(dim=1, keepdim=True).clamp_min(1)


def uniform_prior_penalty(logits: Tensor) -> Tensor:
    """sum_c pi_c log(pi_c / mean_batch p_c) with pi uniform: keeps predictions off a single class. Scalar."""
    mean_probs = F.softmax(logits, dim=1).mean(dim=0)  # (C,)
    prior = torch.full_like(mean_probs, 1.0 / mean_probs.numel())
    return (prior * torch.log(prior / mean_probs)).sum()


class DivideMix(CoTrainedPair):
    def __init__(self, params: DivideMixParams, ctx: BuildContext):
        p = self.params = params
        n, c, device = ctx.num_samples, ctx.num_classes, ctx.device
        self.batch_size, self.seed = ctx.train.batch_size, ctx.seed
        self.pair = TwoNets(ctx, proj_dim=None)  # nets A and B, their optimisers and schedules
        # per-sample state, indexed [net, sample]
        self.loss_history = torch.zeros(2, p.loss_history, n, device=device)  # normalised CE, ring buffer
        self.div_epochs = 0  # division passes so far
        self.w = torch.zeros(2, n, device=device)  # clean probability from each net's division
        self.labeled = torch.zeros(2, n, dtype=torch.bool, device=device)  # X made by each net
        self.targets = torch.full((2, n, c), 1.0 / c, device=device)  # latest training target per net
        self.initialised = False

    # -- the Algorithm protocol ---------------------------------------------------------------

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        p = self.params
        labels = noisy_targets(data.cand)  # (N, C)
        if not self.initialised:
            self.targets.copy_(labels.expand_as(self.targets))
            self.initialised = True
        if epoch < p.warmup_epochs:
            meter = self._warmup_epoch(data, labels)
        else:
            for i in (0, 1):  # both nets divide before either trains (reference ``eval_train``)
                losses = self._sample_losses(i, data, labels)
                self.w[i] = divide(self.loss_history[i], self.div_epochs, losses, data.trusted, seed=self.seed)
                self.labeled[i] = clean_set(self.w[i], data.trusted, p.p_threshold)  # X
            self.div_epochs += 1
            meter = MeanMeter()
            for me in (0, 1):  # co-divide: net A learns on B's split, then B on A's
                peer = 1 - me
                meter.update(self._train_net(me, data, epoch, self.labeled[peer], self.w[peer], labels))
        return {**meter.means("train/"), "train/lr": self.pair.end_epoch()}

    def clean_mask(self) -> Tensor | None:
        return self.labeled.any(dim=0) if self.div_epochs else None

    # -- one epoch ------------------------------------------------------------------------------

    def _warmup_epoch(self, data: TrainData, labels: Tensor) -> MeanMeter:
        """Cross-entropy on the noisy labels (+ confidence penalty), each net on its own shuffle."""
        p, meter = self.params, MeanMeter()
        for i, net, idx in self.pair.warmup_batches(data, p.warmup_batch_factor * self.batch_size):
            logits = net(data.views.weak(data.x[idx]))  # (B, C)
            loss_ce = soft_ce(logits, labels[idx]).mean()
            loss = loss_ce + (neg_entropy(logits).mean() if p.conf_penalty else 0.0)
            self.pair.step(i, loss)
            meter.add(loss=loss, loss_ce=loss_ce)
        return meter

    def _sample_losses(self, i: int, data: TrainData, labels: Tensor) -> Tensor:
        """Per-sample cross-entropy of net i to the noisy label, plain view, eval mode.  # (N,)"""
        return division_pass(
            self.pair.nets[i], data, data.views.plain, lambda logits, idx: soft_ce(logits, labels[idx])
        )

    def _train_net(self, me: int, data: TrainData, epoch: int, labeled: Tensor, w: Tensor, labels: Tensor) -> MeanMeter:
        """One MixMatch epoch of net ``me`` on the split (``labeled``, ``w``) made by its peer."""
        p, meter = self.params, MeanMeter()
        meter.add(**labeled_fraction(me, labeled))
        net, peer = self.pair.train_against(me)
        for idx_x, idx_u, done in split_batches(data, self.batch_size, labeled):
            x_w1, x_w2 = data.views.weak(data.x[idx_x]), data.views.weak(data.x[idx_x])
            u_w1, u_w2 = data.views.weak(data.x[idx_u]), data.views.weak(data.x[idx_u])
            with torch.no_grad():
                # co-guessing on U: both nets, both views
                targets_u = co_guess([F.softmax(m(v), dim=1) for m in (net, peer) for v in (u_w1, u_w2)], p.T)
                # co-refinement on X: the noisy label and the net's own prediction, weighted by the peer's w
                own_x = (F.softmax(net(x_w1), dim=1) + F.softmax(net(x_w2), dim=1)) / 2  # (Bx, C)
                targets_x = co_refine(w[idx_x], labels[idx_x], own_x, p.T)
            self.targets[me, idx_x] = targets_x
            self.targets[me, idx_u] = targets_u

            # MixMatch over [X1, X2, U1, U2]
            mixed_inputs, mixed_targets = mixmatch(
                (x_w1, x_w2), (u_w1, u_w2), targets_x, targets_u, p.mix_alpha, data.generator
            )
            logits = net(mixed_inputs)  # (2Bx + 2Bu, C)
            loss_x, loss_u = mixmatch_losses(logits, mixed_targets, 2 * len(idx_x))
            u_weight = p.lambda_u * linear_ramp(epoch + done - p.warmup_epochs, p.rampup_epochs)
            penalty = uniform_prior_penalty(logits)
            loss = loss_x + u_weight * loss_u + penalty
            self.pair.step(me, loss)
            meter.add(loss=loss, loss_x=loss_x, loss_u=loss_u, loss_penalty=penalty, u_weight=u_weight)
        return meter

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.pair.state_dict(),
            "loss_history": self.loss_history.clone(),
            "div_epochs": self.div_epochs,
            "seed": self.seed,
            "w": self.w.clone(),
            "labeled": self.labeled.clone(),
            "targets": self.targets.clone(),
            "initialised": self.initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pair.load_state_dict(state)
        self.loss_history.copy_(state["loss_history"])
        self.div_epochs = int(state["div_epochs"])
        self.seed = int(state["seed"])
        self.w.copy_(state["w"])
        self.labeled.copy_(state["labeled"])
        self.targets.copy_(state["targets"])
        self.initialised = bool(state["initialised"])
