"""Co-Reg: collaborative consistency regularization for noisy partial labels from VLM annotators.

Papers: Q.-W. Wang, Y. Xie, L. Zhang, Z. Liu, S.-T. Xia, "Pre-trained Vision-Language Models
Assisted Noisy Partial Label Learning" (extended version; equation numbers below are its section
IV), and "Pre-Trained Vision-Language Models as Noisy Partial Annotators", AAAI 2025.
Reference code: github.com/Portugas0807/Co-Reg (``train.py``, ``model.py``,
``contrastive_modules.py``, ``utils/utils_loss.py``, ``utils/utils_algo.py``, ``datasets/*.py``).

Two networks A and B, each with a classifier, a projection head, a momentum key network and a MoCo
queue; one prototype table shared by both. Epochs before ``warmup_epochs`` train each net with
partial cross-entropy plus negative entropy (Eq. 1-3). Every later epoch:

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
2. Before Eq. 4 the predictions go through distribution alignment with a uniform prior (reference
   ``model.py: distribution_alignment``, not in the paper): divided by the mean prediction over the
   training set and renormalised. The mean is taken over the whole division pass; the reference
   updates a per-sample table batch by batch during the pass, so its first batches see a partly
   stale mean. ``distribution_alignment=False`` turns it off.
3. Division losses are min-max normalised and averaged over the last ``loss_history`` (5) epochs
   before the GMM (``max_iter=10, tol=1e-2, reg_covar=5e-4``, ``random_state=seed``), as in
   ``train.py: eval_train``. The paper writes P = {L_div < tau_div}; like the reference we threshold
   the GMM clean probability instead, P = {w > tau_div}. Few-shot trusted samples get w = 1 and are
   always in P.
4. Eq. 5-7 as in the reference: the peer's prediction for P comes from the division pass (one weak
   view, eval mode, aligned); the own mean over K weak views uses the net being trained in train
   mode and the peer in eval mode (reference ``train``: ``net.train(); net2.eval()``).
5. The MSE of Eq. 9 and 10 is a mean over classes (reference ``SemiLoss``, DivideMix), not the sum
   the paper prints: ``lambda_u`` absorbs the factor 1/C. The U weight of Eq. 9 ramps linearly from
   0 to ``lambda_u`` over ``rampup_epochs`` after warm-up, per iteration; the U weight of Eq. 10 is
   ``lambda_u`` without ramp (reference ``ProtConLoss``).
6. MixUp mixes [P_s1, P_s2, U_s1, U_s2] with one random permutation; each position keeps the loss
   type (CE/MSE, KL/MSE) of its first input, as in the reference. Eq. 10's KL uses the mixed target;
   the reference's l KL(t_a) + (1 - l) KL(t_b) differs by a constant only (same gradient).
7. Prototypes (Eq. 11): weak-view embeddings of P samples of the net being trained, indexed by the
   argmax of the sharpened P target, EMA then L2-normalised after each batch (vectorised; the
   reference loops over samples with the same result). Similarity temperature 0.3.
8. Eq. 12 is implemented in the standard SupCon form of the reference ``ModifiedSupConLoss`` (the
   paper prints an extra exp(.) factor before the log). Queries are strong view 1 (not mixed), keys
   strong view 2 through the key net, labels the argmax of the sharpened targets, "confident" = in
   P. The queue starts empty (the reference fills it with random keys, labels and flags).
9. beta1 and beta2 terms enter the loss from ``contrastive_start`` epochs after warm-up (reference:
   ``epoch > start_cont + warm_up``, one epoch later than here); prototypes, key nets and queues are
   updated from the first epoch after warm-up on, as in the reference.
10. Reference quirks, off by default: ``reset_key_each_epoch`` (``init_key_encoder`` at every epoch
    start) and ``cosine_period=800`` (hard-coded cosine period with floor lr * 1e-3).
11. Ablations (paper Table IV): ``co_pseudo_label=False`` (each net labels for itself: own split,
    own prediction for P, own views only for U), ``contrastive="supcon"``, ``prototypes=False``,
    ``use_unlabeled=False`` (U dropped from every loss), ``contrastive="off"``.
12. ``clean_mask()`` is the union of the two nets' P; ``pseudo_labels()`` is the mean over both nets
    of each sample's latest training target (warm-up: own prediction restricted to S).
13. MixUp's lambda and permutation come from ``data.generator``; networks are initialised under
    ``ctx.seed``. The reference seeds nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import AlgorithmSpec, BuildContext, TrainData
from trainables.common.batches import cycle_batches, train_batches
from trainables.common.gmm import clean_set, divide, division_pass
from trainables.common.losses import (
    kl_div, max_candidate_nll, mean_or_zero, neg_entropy, noisy_supcon_loss, partial_ce, soft_ce, squared_error,
)  # fmt: skip
from trainables.common.metrics import MeanMeter
from trainables.common.mixup import mixup, sample_mix_lambda
from trainables.common.moco import KeyQueue, copy_into_key_net, make_key_net, momentum_update
from trainables.common.nets import Net, seeded
from trainables.common.optim import make_optimizer
from trainables.common.prototypes import ema_update_prototypes, prototype_logits
from trainables.common.schedules import linear_ramp
from trainables.common.targets import distribution_alignment, restrict_to_candidates, sharpen


@dataclass(frozen=True)
class CoRegParams:
    warmup_epochs: int = 10
    """Warm-up epochs (Eq. 1-3). The paper uses 20-100 of 100-800; grids set it relative to ``training.epochs``."""
    neg_entropy_weight: float = 1.0
    """Weight of the negative-entropy term in the warm-up loss (Eq. 3 uses 1). Partial CE plus a
    weight-1 entropy bonus is minimised by predictions spread evenly over S, so with large candidate
    sets (synthetic q = 0.3: |S| ~ 3.7) and short warm-ups the nets leave warm-up barely better than
    a uniform guess within S; a smaller weight lets them disambiguate."""
    tau_div: float = 0.5
    """Clean-probability threshold: P = {w > tau_div} (reference ``--p_threshold``)."""
    T: float = 0.5
    """Sharpening temperature (Eq. 8)."""
    num_weak_views: int = 2
    """K, weak views averaged for the pseudo-labels (Eq. 6-7)."""
    lambda_u: float = 1.0
    """Weight of the MSE on U (Eq. 9, after the ramp; Eq. 10 without it)."""
    rampup_epochs: int = 16
    """Epochs after warm-up over which the Eq. 9 U weight ramps linearly from 0 to ``lambda_u``."""
    mix_alpha: float = 4.0
    """MixUp lambda ~ Beta(alpha, alpha) (Eq. 14)."""
    beta1: float = 0.1
    """Weight of the prototypical similarity alignment (Eq. 13)."""
    beta2: float = 0.1
    """Weight of the noisy supervised contrastive loss (Eq. 13)."""
    proj_dim: int = 128
    """Dimension of the L2-normalised projection (prototypes and contrastive keys)."""
    proto_momentum: float = 0.999
    """gamma, EMA momentum of the prototypes (Eq. 11)."""
    proto_temperature: float = 0.3
    """Temperature of the prototype similarity softmax (reference ``--tau_proto``)."""
    moco_momentum: float = 0.999
    """Momentum of the key networks."""
    queue_size: int = 8192
    """Length of each net's MoCo queue (may exceed the number of samples)."""
    cont_temperature: float = 0.07
    """T'', temperature of the contrastive loss (Eq. 12)."""
    contrastive_start: int = 10
    """Epochs after warm-up before the beta1 and beta2 terms enter the loss."""
    loss_history: int = 5
    """Epochs of division losses averaged before the GMM."""
    distribution_alignment: bool = True
    """Align predictions to a uniform prior before the division loss (reference ``--perform_da``)."""
    co_pseudo_label: bool = True
    """Each net trains on its peer's split and predictions; False: on its own (ablation)."""
    contrastive: Literal["noisy", "supcon", "off"] = "noisy"
    """Contrastive loss of Eq. 12: noisy selection of positives, plain SupCon, or none (ablations)."""
    prototypes: bool = True
    """Prototypical similarity alignment (Eq. 10-11); False is the ablation."""
    use_unlabeled: bool = True
    """Train on the unlabeled split U; False drops it from every loss (ablation)."""
    reference_warmup: bool = False
    """Warm up on strong views with twice the batch size, as the reference code does."""
    reset_key_each_epoch: bool = False
    """Re-copy each key net from its net at every epoch start, as the reference code does."""
    cosine_period: int | None = None
    """Cosine period in epochs with floor lr * 1e-3 (reference: 800); None: ``training.epochs``, floor 0."""


def partial_set_targets(w: Tensor, peer_probs: Tensor, cand: Tensor, own_probs: Tensor, T: float) -> Tensor:
    """Targets for x in P: Eq. 5 (restrict the peer to S), Eq. 7 (fuse with weight w), Eq. 8 (sharpen).  # (B, C)"""
    peer_on_s = restrict_to_candidates(peer_probs, cand)  # Eq. 5
    fused = w[:, None] * peer_on_s + (1.0 - w[:, None]) * own_probs  # Eq. 7, x in P
    return sharpen(fused, T)  # Eq. 8


def unlabeled_set_targets(probs_per_view: list[Tensor], T: float) -> Tensor:
    """Targets for x in U: mean of the given softmax outputs (Eq. 6-7, x in U), sharpened (Eq. 8).  # (B, C)"""
    return sharpen(torch.stack(probs_per_view).mean(dim=0), T)


class CoReg:
    def __init__(self, params: CoRegParams, ctx: BuildContext):
        p = self.params = params
        n, c, device = ctx.num_samples, ctx.num_classes, ctx.device
        self.batch_size, self.seed = ctx.train.batch_size, ctx.seed
        with seeded(ctx.seed):
            self.net_a = Net(ctx.make_encoder(), c, p.proj_dim).to(device)
            self.net_b = Net(ctx.make_encoder(), c, p.proj_dim).to(device)
        self.nets = (self.net_a, self.net_b)
        self.key_nets = tuple(make_key_net(net) for net in self.nets)
        self.queues = tuple(KeyQueue(p.queue_size, p.proj_dim).to(device) for _ in self.nets)
        period, floor = (p.cosine_period, 1e-3) if p.cosine_period else (ctx.train.epochs, 0.0)
        optim = [make_optimizer(net.parameters(), ctx.train, period, eta_min_ratio=floor) for net in self.nets]
        self.optimizers, self.schedulers = tuple(o for o, _ in optim), tuple(s for _, s in optim)
        self.prototypes = torch.zeros(c, p.proj_dim, device=device)  # (C, D), shared by both nets
        # per-sample state, indexed [net, sample]
        self.div_history = torch.zeros(2, p.loss_history, n, device=device)  # normalised L_div, ring buffer
        self.div_epochs = 0  # division passes so far
        self.w = torch.zeros(2, n, device=device)  # clean probability from each net's division
        self.targets = torch.full((2, n, c), 1.0 / c, device=device)  # latest training target per net

    # -- the Algorithm protocol ---------------------------------------------------------------

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        p = self.params
        lr = self.optimizers[0].param_groups[0]["lr"]
        if epoch < p.warmup_epochs:
            meter = self._warmup_epoch(data)
        else:
            if p.reset_key_each_epoch:
                for key_net, net in zip(self.key_nets, self.nets):
                    copy_into_key_net(key_net, net)
            aligned = [self._divide(i, data) for i in (0, 1)]
            self.div_epochs += 1
            meter = MeanMeter()
            for me in (0, 1):  # net A learns from B's split, then B from A's
                src = 1 - me if p.co_pseudo_label else me
                in_p = clean_set(self.w[src], data.trusted, p.tau_div)  # P
                meter.update(self._train_net(me, data, epoch, in_p=in_p, w=self.w[src], split_probs=aligned[src]))
        for scheduler in self.schedulers:
            scheduler.step()
        return {**meter.means("train/"), "train/lr": lr}

    @torch.no_grad()
    def predict_nets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of net A and net B (B, C) each, for plain-view inputs."""
        self.net_a.eval()
        self.net_b.eval()
        return self.net_a(x), self.net_b(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        logits_a, logits_b = self.predict_nets(x)
        return logits_a + logits_b

    def pseudo_labels(self) -> Tensor:
        return self.targets.mean(dim=0)

    def clean_mask(self) -> Tensor | None:
        if self.div_epochs == 0:
            return None
        return (self.w > self.params.tau_div).any(dim=0)

    # -- one epoch ------------------------------------------------------------------------------

    def _warmup_epoch(self, data: TrainData) -> MeanMeter:
        """Eq. 1-3 for each net on its own shuffle of the data."""
        p, meter = self.params, MeanMeter()
        batch_size = 2 * self.batch_size if p.reference_warmup else self.batch_size
        view = data.views.strong if p.reference_warmup else data.views.weak
        for i, (net, optimizer) in enumerate(zip(self.nets, self.optimizers)):
            net.train()
            for idx in train_batches(data, batch_size):
                cand = data.cand[idx]  # (B, C)
                logits = net(view(data.x[idx]))  # (B, C)
                loss_sup = partial_ce(logits, cand).mean()  # Eq. 1
                loss_neg = neg_entropy(logits).mean()  # Eq. 2
                loss = loss_sup + p.neg_entropy_weight * loss_neg  # Eq. 3

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                self.targets[i, idx] = restrict_to_candidates(F.softmax(logits.detach(), dim=1), cand)
                meter.add(loss=loss, loss_sup=loss_sup, loss_neg=loss_neg)
        return meter

    @torch.no_grad()
    def _divide(self, i: int, data: TrainData) -> Tensor:
        """Division loss of net i (Eq. 4), GMM -> clean probability self.w[i]. Returns its predictions (N, C)."""
        probs = division_pass(self.nets[i], data, data.views.weak, lambda logits, idx: F.softmax(logits, dim=1))
        if self.params.distribution_alignment:
            probs = distribution_alignment(probs, probs.mean(dim=0))  # (N, C)
        losses = max_candidate_nll(probs, data.cand)  # (N,) Eq. 4
        self.w[i] = divide(self.div_history[i], self.div_epochs, losses, data.trusted, seed=self.seed)
        return probs

    def _train_net(
        self, me: int, data: TrainData, epoch: int, *, in_p: Tensor, w: Tensor, split_probs: Tensor
    ) -> MeanMeter:
        """One epoch of net ``me`` on the split ``in_p`` with clean probabilities ``w`` and split-maker predictions."""
        p, meter = self.params, MeanMeter()
        net, peer = self.nets[me], self.nets[1 - me]
        key_net, queue, optimizer = self.key_nets[me], self.queues[me], self.optimizers[me]
        net.train()
        peer.eval()
        key_net.train()
        label_nets = (net, peer) if p.co_pseudo_label else (net,)
        p_idx = in_p.nonzero().flatten()
        u_idx = (~in_p).nonzero().flatten() if p.use_unlabeled else p_idx[:0]
        u_batches = cycle_batches(data, self.batch_size, u_idx)
        num_iters = max(math.ceil(len(p_idx) / self.batch_size), 1)
        representation_terms = epoch - p.warmup_epochs >= p.contrastive_start
        meter.add(**{f"p_fraction_{'ab'[me]}": in_p.float().mean()})

        for it, idx_x in enumerate(train_batches(data, self.batch_size, p_idx)):
            idx_u = next(u_batches)
            x_x, x_u = data.x[idx_x], data.x[idx_u]
            n_x = len(idx_x)

            # Co-pseudo-labelling (Eq. 5-8)
            with torch.no_grad():
                weak_x = [net.forward_with_embedding(data.views.weak(x_x)) for _ in range(p.num_weak_views)]
                own_x = torch.stack([F.softmax(logits, dim=1) for logits, _ in weak_x]).mean(dim=0)  # (Bx, C)
                z_x_w = weak_x[0][1]  # (Bx, D), moves the prototypes (Eq. 11)
                targets_x = partial_set_targets(w[idx_x], split_probs[idx_x], data.cand[idx_x], own_x, p.T)
                views_u = [data.views.weak(x_u) for _ in range(p.num_weak_views)]
                targets_u = unlabeled_set_targets([F.softmax(m(v), dim=1) for m in label_nets for v in views_u], p.T)
            self.targets[me, idx_x] = targets_x
            self.targets[me, idx_u] = targets_u

            # Self-training on mixed strong views (Eq. 9, 14-17)
            x_s1, x_s2 = data.views.strong(x_x), data.views.strong(x_x)
            u_s1, u_s2 = data.views.strong(x_u), data.views.strong(x_u)
            inputs = torch.cat([x_s1, x_s2, u_s1, u_s2])
            targets = torch.cat([targets_x, targets_x, targets_u, targets_u])
            lam = sample_mix_lambda(p.mix_alpha, data.generator)
            perm = torch.randperm(len(inputs), generator=data.generator).to(inputs.device)
            mixed_inputs, mixed_targets = mixup(inputs, targets, lam, perm)
            logits, z = net.forward_with_embedding(mixed_inputs)  # (2Bx + 2Bu, C), (2Bx + 2Bu, D)
            in_x = slice(0, 2 * n_x)
            in_u = slice(2 * n_x, None)
            loss_sup = soft_ce(logits[in_x], mixed_targets[in_x]).mean()  # Eq. 9, x in P
            loss_u = mean_or_zero(squared_error(F.softmax(logits[in_u], dim=1), mixed_targets[in_u]))  # Eq. 9, U
            u_weight = p.lambda_u * linear_ramp(epoch + it / num_iters - p.warmup_epochs, p.rampup_epochs)

            # Prototypical similarity alignment (Eq. 10-11)
            loss_prot = logits.new_zeros(())
            if p.prototypes:
                pseudo_x = targets_x.argmax(dim=1)  # (Bx,)
                self.prototypes = ema_update_prototypes(self.prototypes, z_x_w, pseudo_x, p.proto_momentum)  # Eq. 11
                sim = prototype_logits(z, self.prototypes, p.proto_temperature)  # (2Bx + 2Bu, C)
                loss_prot_x = kl_div(F.log_softmax(sim[in_x], dim=1), mixed_targets[in_x]).mean()  # Eq. 10, P
                loss_prot_u = mean_or_zero(squared_error(F.softmax(sim[in_u], dim=1), mixed_targets[in_u]))  # Eq. 10, U
                loss_prot = loss_prot_x + p.lambda_u * loss_prot_u

            # Noisy supervised contrastive learning (Eq. 12)
            loss_cont = logits.new_zeros(())
            if p.contrastive != "off":
                labels = torch.cat([targets_x, targets_u]).argmax(dim=1)  # (Bx + Bu,)
                confident = torch.arange(len(labels), device=labels.device) < n_x  # in P
                with torch.no_grad():
                    momentum_update(key_net, net, p.moco_momentum)
                    _, k = key_net.forward_with_embedding(torch.cat([x_s2, u_s2]))  # (Bx + Bu, D)
                if representation_terms:
                    _, q = net.forward_with_embedding(torch.cat([x_s1, u_s1]))  # (Bx + Bu, D)
                    queue_keys, queue_labels, queue_confident = queue.contents()
                    loss_cont = noisy_supcon_loss(
                        q, k, queue_keys, labels, confident, queue_labels, queue_confident,
                        temperature=p.cont_temperature, mode=p.contrastive,
                    )  # fmt: skip
                queue.enqueue(k, labels, confident)

            beta1, beta2 = (p.beta1, p.beta2) if representation_terms else (0.0, 0.0)
            loss = loss_sup + u_weight * loss_u + beta1 * loss_prot + beta2 * loss_cont  # Eq. 13
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            meter.add(loss=loss, loss_sup=loss_sup)
            if p.use_unlabeled:
                meter.add(loss_u=loss_u, u_weight=u_weight)
            if p.prototypes:
                meter.add(loss_prot=loss_prot)
            if representation_terms and p.contrastive != "off":
                meter.add(loss_cont=loss_cont)
        return meter

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "prototypes": self.prototypes.clone(),
            "div_history": self.div_history.clone(),
            "div_epochs": self.div_epochs,
            "seed": self.seed,
            "w": self.w.clone(),
            "targets": self.targets.clone(),
        }
        for i, s in enumerate("ab"):
            state[f"net_{s}"] = self.nets[i].state_dict()
            state[f"key_net_{s}"] = self.key_nets[i].state_dict()
            state[f"queue_{s}"] = self.queues[i].state_dict()
            state[f"optimizer_{s}"] = self.optimizers[i].state_dict()
            state[f"scheduler_{s}"] = self.schedulers[i].state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate("ab"):
            self.nets[i].load_state_dict(state[f"net_{s}"])
            self.key_nets[i].load_state_dict(state[f"key_net_{s}"])
            self.queues[i].load_state_dict(state[f"queue_{s}"])
            self.optimizers[i].load_state_dict(state[f"optimizer_{s}"])
            self.schedulers[i].load_state_dict(state[f"scheduler_{s}"])
        self.prototypes.copy_(state["prototypes"])
        self.div_history.copy_(state["div_history"])
        self.div_epochs = int(state["div_epochs"])
        self.seed = int(state["seed"])
        self.w.copy_(state["w"])
        self.targets.copy_(state["targets"])


SPEC = AlgorithmSpec(
    name="coreg",
    params=CoRegParams,
    build=CoReg,
    consumes="cand",
    ablations={
        "no_co_pseudo_label": {"co_pseudo_label": False},
        "supcon": {"contrastive": "supcon"},
        "no_prototypes": {"prototypes": False},
        "no_unlabeled": {"use_unlabeled": False},
        "no_noisy_contrastive": {"contrastive": "off"},
    },
    description="Co-Reg (Wang et al. 2025): two nets, co-pseudo-labelling, prototype alignment, noisy contrastive.",
)
