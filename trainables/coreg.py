"""Co-Reg: collaborative consistency regularization for noisy partial labels from VLM annotators.

Papers: Q.-W. Wang, Y. Xie, L. Zhang, Z. Liu, S.-T. Xia, "Pre-trained Vision-Language Models
Assisted Noisy Partial Label Learning" (extended version; equation numbers below are its section
IV), and "Pre-Trained Vision-Language Models as Noisy Partial Annotators", AAAI 2025.
Reference code: github.com/Portugas0807/Co-Reg (``train.py``, ``model.py``,
``contrastive_modules.py``, ``utils/utils_loss.py``, ``utils/utils_algo.py``, ``datasets/*.py``).

Two networks A and B (``common/two_net.TwoNets``), each with a classifier, a projection head, a momentum key
network and a MoCo queue; one prototype table shared by both. Epochs before ``warmup_epochs`` train each net
with partial cross-entropy plus negative entropy (Eq. 1-3). Every later epoch:

1. Division: each net scores every sample with L_div = -log max_{j in S} p_j on a weak view
   (Eq. 4); a 2-component GMM turns the scores into a clean probability w; P = {w > tau_div}, U = rest.
2. Co-pseudo-labelling: net A trains on the split and predictions made by net B, then B on A's
   (Eq. 5-8). P target: w * (B's prediction restricted to S) + (1 - w) * A's own mean over K weak
   views; U target: mean of both nets over K weak views; both sharpened with temperature T.
3. Self-training on mixed strong views: CE on P, MSE on U (Eq. 9, MixUp Eq. 14-17); prototypical
   similarity alignment (Eq. 10-11); noisy supervised contrastive loss (Eq. 12); L = Eq. 13.

Implementation details / deviations:
1. Warm-up uses weak views at ``batch_size``; the reference (``datasets/*.py``, ``run('warmup')``)
   uses strong views and twice the batch size: ``reference_warmup=True``.
2. Before Eq. 4 the predictions are aligned to a uniform prior (reference ``model.py:
   distribution_alignment``, not in the paper): divided by their mean over the whole division pass
   (the reference's per-sample table is partly stale in its first batches), renormalised;
   ``distribution_alignment=False`` turns it off.
3. Division losses are min-max normalised and averaged over the last ``loss_history`` (5) epochs
   before the GMM (``max_iter=10, tol=1e-2, reg_covar=5e-4``, ``random_state=seed``), as in
   ``train.py: eval_train``. The paper writes P = {L_div < tau_div}; like the reference we threshold
   the GMM clean probability, {w > tau_div}. Few-shot trusted samples get w = 1, always in P.
4. Eq. 5-7 as in the reference: the peer's prediction for P comes from the division pass (one weak
   view, eval mode, aligned); the own mean over K weak views uses the net being trained in train
   mode and the peer in eval mode (reference ``train``: ``net.train(); net2.eval()``).
5. The MSE of Eq. 9 and 10 is a mean over classes (reference ``SemiLoss``, DivideMix), not the sum
   the paper prints: ``lambda_u`` absorbs the factor 1/C. The U weight of Eq. 9 ramps linearly from
   0 to ``lambda_u`` over ``rampup_epochs`` after warm-up, per iteration; the U weight of Eq. 10 is
   ``lambda_u`` without ramp (reference ``ProtConLoss``).
6. MixUp (``mixup.mixmatch``) mixes [P_s1, P_s2, U_s1, U_s2] with one random permutation; each position keeps
   the loss type (CE/MSE, KL/MSE) of its first input, as in the reference. Eq. 10's KL uses the mixed target;
   the reference's l KL(t_a) + (1 - l) KL(t_b) differs by a constant only (same gradient).
7. Prototypes (Eq. 11): weak-view embeddings of P samples of the net being trained, indexed by the
   argmax of the sharpened P target, EMA then L2-normalised after each batch (vectorised; the
   reference loops over samples with the same result). Similarity temperature 0.3.
8. Eq. 12 is implemented in the standard SupCon form of the reference ``ModifiedSupConLoss`` (the
   paper prints an extra exp(.) factor before the log). Queries are strong view 1 (not mixed), keys
   strong view 2 through the key net, labels the argmax of the sharpened targets, "confident" = in
   P. The queue starts empty (the reference fills it with random keys, labels and flags).
9. beta1 and beta2 terms enter the loss ``contrastive_start`` epochs after warm-up (reference: one
   epoch later); prototypes, key nets and queues are updated from the first epoch after warm-up on.
10. As the reference (``init_key_encoder``), each key net is re-copied from its net at every epoch
    start (``reset_key_each_epoch``); at momentum 0.999 a key net otherwise lags far behind in a
    short run and Eq. 12 stays near its maximum (README). Without it, the key nets start from the
    nets at the end of the warm-up (``restart_keys_after_warmup``). Off by default: ``cosine_period=800``.
11. Ablations (paper Table IV): ``co_pseudo_label=False`` (each net labels for itself: own split,
    own prediction for P, own views only for U), ``contrastive="supcon"``, ``prototypes=False``,
    ``use_unlabeled=False`` (U dropped from every loss), ``contrastive="off"``.
12. ``clean_mask()``: the union of the two nets' P; ``pseudo_labels()``: the mean over both nets of
    each sample's latest training target (warm-up: own prediction restricted to S).
13. MixUp's lambda and permutation come from ``data.generator``; networks are initialised under
    ``ctx.seed``. The reference seeds nothing.
14. P is taken class by class (``balanced_division``, ``gmm.partial_set``): as many samples as
    {w > tau_div}, an equal quota per class guessed by the split-making net, highest w first. After
    a short warm-up P = {w > tau_div} holds almost none of the classes the nets disfavour, its
    targets relabel them and the predictions pile onto a few classes (README, "Co-Reg after a short
    warm-up"; the reference does the same). False: the paper's P.
15. The warm-up is lengthened to the paper's in optimiser steps where the budget allows
    (``warmup_steps`` 3920 per net: its shortest, 20 CIFAR-10 epochs at batch 256; at most
    ``max_warmup_fraction`` 2/3 of the epochs; never shortened). The paper warms up for 20-100 of
    100-800 epochs, thousands of steps; a 10-epoch warm-up on 900 images is 150 steps and leaves
    near-uniform nets (Eq. 3's entropy term keeps them so), from which the stage of Eq. 9-14 falls:
    on the README's 900-image Fashion-MNIST subset (lr 0.01 and 0.05, seeds 0 and 1) it ends at
    30.5 / 31.9 / 58.6 / 25.7% after a 10-epoch warm-up, 60.2 / 56.4 / 52.0 / 46.3% after 20 of 30
    epochs (what this rule gives there); on full digits (20 of 30 instead of 8) the README's four
    runs move from a mean of 96.4 to 95.9% (eta 0.1 gains, one eta 0.3 seed loses 4 points), on the
    2000-image Fashion-MNIST table (13 of 20) from 67.2 to 65.8% at eta 0.3. The
    stage still does not beat its warm-up in such budgets; the longer warm-up leaves it less time
    to fall. ``warmup_steps: 0`` is the paper's fixed ``warmup_epochs``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import split_batches
from trainables.common.diagnostics import pair_diagnostics
from trainables.common.gmm import divide, division_pass, partial_set
from trainables.common.losses import kl_div, max_candidate_nll, mean_or_zero, neg_entropy, noisy_supcon_loss
from trainables.common.losses import partial_ce, squared_error
from trainables.common.metrics import MeanMeter
from trainables.common.mixup import mixmatch, mixmatch_losses
from trainables.common.moco import KeyQueue, copy_into_key_net, make_key_net, momentum_update
from trainables.common.prototypes import ema_update_prototypes, prototype_logits
from trainables.common.schedules import linear_ramp, warmup_length
from trainables.common.targets import co_guess, co_refine, distribution_alignment, restrict_to_candidates
from trainables.common.two_net import CoTrainedPair, TwoNets, labeled_fraction, load_per_net, per_net_state
from trainables.params.coreg import CoRegParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


def partial_set_targets(w: Tensor, peer_probs: Tensor, cand: Tensor, own_probs: Tensor, T: float) -> Tensor:
    """Targets for x in P: Eq. 5 (restrict the peer to S), Eq. 7 (fuse with weight w), Eq. 8 (sharpen).  # (B, C)"""
    return co_refine(w, restrict_to_candidates(peer_probs, cand), own_probs, T)


class CoReg(CoTrainedPair):
    def __init__(self, params: CoRegParams, ctx: BuildContext):
        p = self.params = params
        n, c, device = ctx.num_samples, ctx.num_classes, ctx.device
        self.batch_size, self.seed = ctx.train.batch_size, ctx.seed
        warmup_batch = 2 * self.batch_size if p.reference_warmup else self.batch_size
        self.warmup_epochs = warmup_length(
            p.warmup_epochs, p.warmup_steps, -(-n // warmup_batch), ctx.train.epochs, p.max_warmup_fraction
        )  # fmt: skip
        period, floor = (p.cosine_period, 1e-3) if p.cosine_period else (ctx.train.epochs, 0.0)
        self.pair = TwoNets(ctx, proj_dim=p.proj_dim, period=period, eta_min_ratio=floor)  # nets A and B
        self.key_nets = tuple(make_key_net(net) for net in self.pair.nets)
        self.queues = tuple(KeyQueue(p.queue_size, p.proj_dim).to(device) for _ in self.pair.nets)
        self.prototypes = torch.zeros(c, p.proj_dim, device=device)  # (C, D), shared by both nets
        # per-sample state, indexed [net, sample]
        self.div_history = torch.zeros(2, p.loss_history, n, device=device)  # normalised L_div, ring buffer
        self.div_epochs = 0  # division passes so far
        self.w = torch.zeros(2, n, device=device)  # clean probability from each net's division
        self.in_p = torch.zeros(2, n, dtype=torch.bool, device=device)  # P of each net's division
        self.targets = torch.full((2, n, c), 1.0 / c, device=device)  # latest training target per net

    # -- the Algorithm protocol ---------------------------------------------------------------

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        p = self.params
        if epoch < self.warmup_epochs:
            meter = self._warmup_epoch(data)
        else:
            if p.reset_key_each_epoch or (p.restart_keys_after_warmup and epoch == self.warmup_epochs):
                for key_net, net in zip(self.key_nets, self.pair.nets):
                    copy_into_key_net(key_net, net)
            aligned = [self._divide(i, data) for i in (0, 1)]
            self.div_epochs += 1
            meter = MeanMeter()
            for me in (0, 1):  # net A learns from B's split, then B from A's
                src = 1 - me if p.co_pseudo_label else me
                self.in_p[src] = partial_set(self.w[src], data, p.tau_div, aligned[src], balanced=p.balanced_division)
                meter.update(self._train_net(me, data, epoch, in_p=self.in_p[src], w=self.w[src], split_probs=aligned[src]))
        return {**meter.means("train/"), "train/lr": self.pair.end_epoch()}

    def clean_mask(self) -> Tensor | None:
        return self.in_p.any(dim=0) if self.div_epochs else None

    def diagnostics(self, probe: Tensor) -> dict[str, float]:
        """``api.Diagnosed``; none during the warm-up, which trains neither projector nor key nets."""
        return pair_diagnostics(self.pair.nets, self.key_nets, self.queues, self.prototypes, probe) if self.div_epochs else {}

    # -- one epoch ------------------------------------------------------------------------------

    def _warmup_epoch(self, data: TrainData) -> MeanMeter:
        """Eq. 1-3 for each net on its own shuffle of the data."""
        p, meter = self.params, MeanMeter()
        batch_size = 2 * self.batch_size if p.reference_warmup else self.batch_size
        view = data.views.strong if p.reference_warmup else data.views.weak
        for i, net, idx in self.pair.warmup_batches(data, batch_size):
            cand = data.cand[idx]  # (B, C)
            logits = net(view(data.x[idx]))  # (B, C)
            loss_sup = partial_ce(logits, cand).mean()  # Eq. 1
            loss_neg = neg_entropy(logits).mean()  # Eq. 2
            loss = loss_sup + p.neg_entropy_weight * loss_neg  # Eq. 3
            self.pair.step(i, loss)
            self.targets[i, idx] = restrict_to_candidates(F.softmax(logits.detach(), dim=1), cand)
            meter.add(loss=loss, loss_sup=loss_sup, loss_neg=loss_neg)
        return meter

    @torch.no_grad()
    def _divide(self, i: int, data: TrainData) -> Tensor:
        """Division loss of net i (Eq. 4), GMM -> clean probability self.w[i]. Returns its predictions (N, C)."""
        probs = division_pass(self.pair.nets[i], data, data.views.weak, lambda logits, idx: F.softmax(logits, dim=1))
        if self.params.distribution_alignment:
            probs = distribution_alignment(probs, probs.mean(dim=0))  # (N, C)
        losses = max_candidate_nll(probs, data.cand)  # (N,) Eq. 4
        self.w[i] = divide(self.div_history[i], self.div_epochs, losses, data.trusted, seed=self.seed)
        return probs

    def _train_net(self, me: int, data: TrainData, epoch: int, *, in_p: Tensor, w: Tensor, split_probs: Tensor) -> MeanMeter:
        """One epoch of net ``me`` on the split ``in_p`` with clean probabilities ``w`` and split-maker predictions."""
        p, meter = self.params, MeanMeter()
        meter.add(**labeled_fraction(me, in_p))
        self.pair.train_against(me)
        self.key_nets[me].train()
        representation = epoch - self.warmup_epochs >= p.contrastive_start  # the beta1, beta2 terms are on
        for idx_x, idx_u, done in split_batches(data, self.batch_size, in_p, use_unlabeled=p.use_unlabeled):
            u_weight = p.lambda_u * linear_ramp(epoch + done - self.warmup_epochs, p.rampup_epochs)
            meter.add(**self._train_step(me, data, idx_x, idx_u, w, split_probs, u_weight, representation))
        return meter

    @torch.no_grad()
    def _co_pseudo_labels(
        self, me: int, data: TrainData, idx_x: Tensor, idx_u: Tensor, w_x: Tensor, split_probs_x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Targets for P (Eq. 5, 7, 8) and U (Eq. 6-8), and the weak-view embeddings of P (for Eq. 11)."""
        p, net = self.params, self.pair.nets[me]
        label_nets = (net, self.pair.nets[1 - me]) if p.co_pseudo_label else (net,)
        weak_x = [net.forward_with_embedding(data.views.weak(data.x[idx_x])) for _ in range(p.num_weak_views)]
        own_x = torch.stack([F.softmax(logits, dim=1) for logits, _ in weak_x]).mean(dim=0)  # (Bx, C)
        targets_x = partial_set_targets(w_x, split_probs_x, data.cand[idx_x], own_x, p.T)
        views_u = [data.views.weak(data.x[idx_u]) for _ in range(p.num_weak_views)]
        targets_u = co_guess([F.softmax(m(v), dim=1) for m in label_nets for v in views_u], p.T)
        return targets_x, targets_u, weak_x[0][1]

    def _train_step(
        self, me: int, data: TrainData, idx_x: Tensor, idx_u: Tensor, w: Tensor, split_probs: Tensor,
        u_weight: float, representation: bool,
    ) -> dict[str, Tensor | float]:  # fmt: skip
        """Eq. 5-13 on a batch of P and one of U, then one step of net ``me``; returns what to report."""
        p, net = self.params, self.pair.nets[me]
        targets_x, targets_u, z_x_w = self._co_pseudo_labels(me, data, idx_x, idx_u, w[idx_x], split_probs[idx_x])
        self.targets[me, idx_x], self.targets[me, idx_u] = targets_x, targets_u
        # self-training on mixed strong views (Eq. 9, 14-17)
        x_s1, x_s2 = data.views.strong(data.x[idx_x]), data.views.strong(data.x[idx_x])
        u_s1, u_s2 = data.views.strong(data.x[idx_u]), data.views.strong(data.x[idx_u])
        mixed_inputs, mixed = mixmatch((x_s1, x_s2), (u_s1, u_s2), targets_x, targets_u, p.mix_alpha, data.generator)
        logits, z = net.forward_with_embedding(mixed_inputs)  # (2Bx + 2Bu, C), (2Bx + 2Bu, D)
        n_x = 2 * len(idx_x)
        loss_x, loss_u = mixmatch_losses(logits, mixed, n_x)  # Eq. 9: CE on P, MSE on U
        report = {"loss_x": loss_x, "loss_u": loss_u, "u_weight": u_weight} if p.use_unlabeled else {"loss_x": loss_x}
        loss_prot = loss_cont = logits.new_zeros(())
        if p.prototypes:
            loss_prot = report["loss_prot"] = self._prototype_alignment(z, z_x_w, targets_x, mixed, n_x)  # Eq. 10-11
        if p.contrastive != "off":
            loss_cont = self._noisy_contrastive(me, (x_s1, u_s1), (x_s2, u_s2), targets_x, targets_u, representation)
            if representation:
                report["loss_cont"] = loss_cont
        beta1, beta2 = (p.beta1, p.beta2) if representation else (0.0, 0.0)
        loss = loss_x + u_weight * loss_u + beta1 * loss_prot + beta2 * loss_cont  # Eq. 13
        self.pair.step(me, loss)
        return {"loss": loss, **report}

    def _prototype_alignment(self, z: Tensor, z_x_w: Tensor, targets_x: Tensor, mixed: Tensor, n_x: int) -> Tensor:
        """Eq. 11 (prototype EMA from P's weak views), then Eq. 10: KL on the P part, MSE on the U part. Scalar."""
        p = self.params
        self.prototypes = ema_update_prototypes(self.prototypes, z_x_w, targets_x.argmax(dim=1), p.proto_momentum)
        sim = prototype_logits(z, self.prototypes, p.proto_temperature)  # (2Bx + 2Bu, C)
        loss_prot_x = kl_div(F.log_softmax(sim[:n_x], dim=1), mixed[:n_x]).mean()  # Eq. 10, P
        loss_prot_u = mean_or_zero(squared_error(F.softmax(sim[n_x:], dim=1), mixed[n_x:]))  # Eq. 10, U
        return loss_prot_x + p.lambda_u * loss_prot_u

    def _noisy_contrastive(
        self, me: int, queries: tuple[Tensor, Tensor], keys: tuple[Tensor, Tensor],
        targets_x: Tensor, targets_u: Tensor, representation: bool,
    ) -> Tensor:  # fmt: skip
        """Eq. 12: strong view 1 (queries) against view 2 through the key net and the queue; queues the keys."""
        p, net, key_net, queue = self.params, self.pair.nets[me], self.key_nets[me], self.queues[me]
        labels = torch.cat([targets_x, targets_u]).argmax(dim=1)  # (Bx + Bu,)
        confident = torch.arange(len(labels), device=labels.device) < len(targets_x)  # in P
        with torch.no_grad():
            momentum_update(key_net, net, p.moco_momentum)
            _, k = key_net.forward_with_embedding(torch.cat(keys))  # (Bx + Bu, D)
        loss_cont = k.new_zeros(())
        if representation:
            _, q = net.forward_with_embedding(torch.cat(queries))  # (Bx + Bu, D)
            queue_keys, queue_labels, queue_confident = queue.contents()
            loss_cont = noisy_supcon_loss(
                q, k, queue_keys, labels, confident, queue_labels, queue_confident,
                temperature=p.cont_temperature, mode=p.contrastive,
            )  # fmt: skip
        queue.enqueue(k, labels, confident)
        return loss_cont

    # -- checkpoints ----------------------------------------------------------------------------

    TENSORS = ("prototypes", "div_history", "w", "in_p", "targets")
    """Tensors of the checkpoint besides the networks, key nets, queues and optimisers."""

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.pair.state_dict(),
            **per_net_state("key_net", self.key_nets),
            **per_net_state("queue", self.queues),
            **{name: getattr(self, name).clone() for name in self.TENSORS},
            "div_epochs": self.div_epochs,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pair.load_state_dict(state)
        load_per_net(state, "key_net", self.key_nets)
        load_per_net(state, "queue", self.queues)
        for name in self.TENSORS:
            getattr(self, name).copy_(state[name])
        self.div_epochs = int(state["div_epochs"])
        self.seed = int(state["seed"])
