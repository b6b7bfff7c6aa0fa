"""ALIM's pieces (Xu et al., NeurIPS 2023; github zeroQiaoba/ALIM ``utils/utils_loss.py``, ``train_merge.py``).

The candidate set is softened to S~ = S + lambda (1 - S) and the pseudo-label target is
w = Normalize(S~ * P) (poster Eq. 1-2), with ``onehot`` (the maximum set to 1, the rest 0) or
``scale`` (z^(1/K), renormalised). lambda = 0 trusts S fully (PiCO / PRODEN); lambda = 1 ignores it.
The adaptive lambda is the eta-quantile over the training set of the ratio
max_{j in S} P_j / max_{j not in S} P_j (poster Eq. 6), capped at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.confidence import CandidateConfidence
from trainables.common.gmm import clean_probability
from trainables.common.losses import soft_ce
from trainables.common.metrics import MeanMeter
from trainables.common.mixup import mixup, sample_mix_lambda
from trainables.common.pico import (
    ContrastiveClassifier, contrast_set, masked_supcon_loss, moco_loss, moving_average, phi_at, same_label_mask,
)  # fmt: skip

NORMALISATIONS = ("onehot", "scale")
LAMBDA_MODES = ("adaptive", "fixed")
RATIO_EPS = 1e-9
"""Added to the denominator of the ratio, as in the reference (``1e-9 + max(...)``)."""


@dataclass(frozen=True)
class ALIMParams:
    """Settings shared by ALIM-Onehot and ALIM-Scale (their modules document the defaults)."""
    lambda_mode: Literal["adaptive", "fixed"] = "adaptive"
    """``adaptive``: eta-quantile of the ratios (poster Eq. 6); ``fixed``: ``lam`` from ``lambda_start`` on."""
    lam: float = 0.5
    """lambda of the fixed mode (0 trusts S, 1 ignores it)."""
    lambda_start: int = 5
    """e0: epoch from which lambda is adjusted (reference ``--piror_start``)."""
    eta_hint: float | None = None
    """A user-given noise rate for the adaptive mode; None estimates it by a GMM on the log-ratios."""
    eta_scale: float = 1.0
    """Multiplies the estimated eta (adaptive mode without ``eta_hint``)."""
    cap_lambda: bool = True
    """Cap the adaptive lambda at 1 (reference ``--max1``, set in every published run)."""
    warmup_epochs: int = 0
    """PiCO-style warm-up epochs (uniform conf, MoCo); the reference has none."""
    mixup_weight: float = 1.0
    """Weight of the MixUp loss (reference ``--loss_weight_mixup``; 0 turns it off)."""
    mix_alpha: float = 4.0
    """MixUp lambda ~ Beta(alpha, alpha) (reference ``--alpha``)."""
    cont_weight: float = 0.5
    """Weight of the SupCon loss (reference ``--loss_weight``)."""
    phi_start: float = 0.95
    """Moving-average coefficient of the pseudo-labels at the first epoch."""
    phi_end: float = 0.8
    """... ramped linearly to this value at the last epoch."""
    proto_momentum: float = 0.99
    """EMA momentum of the prototypes."""
    proto_temperature: float = 0.07
    """Temperature of the prototype similarity P (reference ``--vMF``)."""
    proj_dim: int = 128
    """Dimension of the L2-normalised projection."""
    moco_momentum: float = 0.999
    """Momentum of the key network."""
    queue_size: int = 8192
    """Length of the MoCo key queue."""
    temperature: float = 0.07
    """Temperature of the contrastive losses."""


def relaxed_candidates(cand: Tensor, lam: float | Tensor) -> Tensor:
    """S~ = S + lambda (1 - S); ``lam`` is a float or a (B, 1) tensor.  # (B, C)"""
    return cand + lam * (1.0 - cand)


def alim_target(probs: Tensor, cand: Tensor, lam: float | Tensor, normalise: str, k: float = 1.0) -> Tensor:
    """w = Normalize(S~ * P): ``onehot`` = one-hot of the argmax; ``scale`` = z^(1/k) / sum_j z_j^(1/k).  # (B, C)"""
    z = relaxed_candidates(cand, lam) * probs
    if normalise == "onehot":
        return F.one_hot(z.argmax(dim=1), probs.shape[1]).to(probs.dtype)
    if normalise == "scale":
        powered = z ** (1.0 / k)
        return powered / powered.sum(dim=1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"unknown normalisation {normalise!r}; allowed: {', '.join(NORMALISATIONS)}")


def candidate_ratio(probs: Tensor, cand: Tensor) -> Tensor:
    """max_{j in S} P_j / (eps + max_{j not in S} P_j) (poster Eq. 6); large when S holds every class.  # (B,)"""
    return (probs * cand).amax(dim=1) / (RATIO_EPS + (probs * (1.0 - cand)).amax(dim=1))


def adaptive_lambda(ratio: Tensor, eta: float, cap: bool = True) -> float:
    """The eta-quantile of the ratios: sorted(ratio)[int(N * eta)] as the reference, capped at 1.

    With this lambda, argmax(S~ * P) leaves S for exactly the samples whose ratio is below it,
    i.e. (up to ties) the eta fraction of the training set with the weakest candidate sets.
    """
    ordered = torch.sort(ratio.flatten()).values
    index = min(max(int(len(ordered) * eta), 0), len(ordered) - 1)
    lam = float(ordered[index])
    return min(lam, 1.0) if cap else lam


def estimate_noise_rate(ratio: Tensor, seed: int = 0) -> float:
    """eta estimated without labels: mass of the low component of a 2-GMM on log(ratio).

    A sample whose candidate set misses its true label has its prediction outside S once the
    model has learned, so its log-ratio is negative; correct sets give positive log-ratios. The
    estimate is the mean posterior of the low-ratio component (DivideMix-style GMM, ``gmm.py``).
    log-ratios are clipped to [-20, 20] (S = all classes gives ~1e9).
    """
    log_ratio = torch.log(ratio.clamp_min(1e-12)).clamp(-20.0, 20.0)
    clean = clean_probability(-log_ratio, seed=seed)  # posterior of the high-ratio component
    return float(1.0 - clean.mean())


class ALIM:
    """ALIM on top of PiCO (the reference ``train_merge.py``): one contrastive classifier, softened S.

    ``params`` is an ``ALIMParams`` (``ALIMOnehotParams`` / ``ALIMScaleParams``: their modules
    document the method and its deviations); ``normalise`` and ``k`` pick the variant.
    """

    def __init__(self, params: ALIMParams, ctx: BuildContext, normalise: str, k: float = 1.0):
        if normalise not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalise!r}; allowed: {', '.join(NORMALISATIONS)}")
        if params.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"unknown lambda_mode {params.lambda_mode!r}; allowed: {', '.join(LAMBDA_MODES)}")
        p = self.params = params
        self.normalise, self.k = normalise, k
        n, c, device = ctx.num_samples, ctx.num_classes, ctx.device
        self.model = ContrastiveClassifier(
            ctx, proj_dim=p.proj_dim, queue_size=p.queue_size, moco_momentum=p.moco_momentum
        )
        self.epochs, self.batch_size, self.seed = ctx.train.epochs, ctx.train.batch_size, ctx.seed
        self.conf = CandidateConfidence(n, c, device)  # (N, C) pseudo-labels w
        self.ratio = torch.ones(n, device=device)  # (N,) latest max_S P / max_notS P (poster Eq. 6)
        self.trusted = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) revealed few-shot labels
        self.lam = 0.0  # lambda of the current epoch; 0 (trust S) before lambda_start
        self.adjusted = False  # lambda has been set at least once
        self.eta_hat = float("nan")

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        p, model = self.params, self.model
        if self.conf.start(data.cand):
            self.trusted.copy_(data.trusted)
        updating = epoch >= p.warmup_epochs
        phi = phi_at(epoch, self.epochs, p.phi_start, p.phi_end)
        model.train_mode()
        meter = MeanMeter()
        for idx in train_batches(data, self.batch_size):
            x, cand = data.x[idx], data.cand[idx]
            lam = torch.where(data.trusted[idx], 0.0, self.lam)[:, None]  # (B, 1): a revealed label stays
            x_w = data.views.weak(x)
            logits, q, k = model.forward(x_w, data.views.strong(x))
            labels = (relaxed_candidates(cand, lam) * F.softmax(logits.detach(), dim=1)).argmax(dim=1)  # (B,)
            scores = model.prototype_scores(q, p.proto_temperature)  # (B, C) P of the poster, before the update
            self.ratio[idx] = candidate_ratio(scores, cand)
            model.update_prototypes(q, labels, p.proto_momentum)
            queue_keys, queue_labels, _ = model.queue.contents()

            if updating:
                target = alim_target(scores, cand, lam, self.normalise, self.k)  # (B, C) poster Eq. 2
                self.conf[idx] = moving_average(self.conf[idx], target, phi)
                contrast, contrast_labels = contrast_set(q, k, labels, queue_keys, queue_labels)  # (2B + Q, D)
                positive = same_label_mask(labels, contrast_labels)
                loss_cont = masked_supcon_loss(q, contrast, positive, p.temperature).mean()
            else:
                loss_cont = moco_loss(q, k, queue_keys, p.temperature).mean()

            targets = self.conf[idx]  # (B, C)
            loss_cls = soft_ce(logits, targets).mean()
            loss = loss_cls + p.cont_weight * loss_cont
            if p.mixup_weight > 0:
                mix_lam = sample_mix_lambda(p.mix_alpha, data.generator)
                perm = torch.randperm(len(idx), generator=data.generator).to(x_w.device)
                x_mix, targets_mix = mixup(x_w, targets, mix_lam, perm)
                loss_mix = soft_ce(model.net(x_mix), targets_mix).mean()
                loss = loss + p.mixup_weight * loss_mix
                meter.add(loss_mix=loss_mix)
            model.step(loss)
            model.enqueue_all(k, labels)
            meter.add(loss=loss, loss_cls=loss_cls, loss_cont=loss_cont)
        lr = model.end_epoch()
        metrics = {**meter.means("train/"), "train/lambda": self.lam, "train/lr": lr}
        if epoch + 1 >= p.lambda_start:
            self._update_lambda()
            if p.lambda_mode == "adaptive":
                metrics["train/eta_hat"] = self.eta_hat
        return metrics

    def _update_lambda(self) -> None:
        """lambda for the next epochs: fixed, or the eta-quantile of this epoch's ratios (reference ``piror``)."""
        p = self.params
        self.adjusted = True
        if p.lambda_mode == "fixed":
            self.lam = p.lam
            return
        untrusted = ~self.trusted
        ratio = self.ratio[untrusted] if untrusted.any() else self.ratio
        self.eta_hat = estimate_noise_rate(ratio, seed=self.seed)
        eta = p.eta_hint if p.eta_hint is not None else min(max(p.eta_scale * self.eta_hat, 0.0), 1.0)
        self.lam = adaptive_lambda(ratio, eta, cap=p.cap_lambda)

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.table.clone()

    def clean_mask(self) -> Tensor | None:
        """Samples whose candidate set still wins under the current lambda (the poster's clean/noisy boundary)."""
        if not self.adjusted:
            return None
        return (self.ratio >= self.lam) | self.trusted

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.model.state_dict(),
            **self.conf.state_dict(),
            "ratio": self.ratio.clone(),
            "trusted": self.trusted.clone(),
            "lam": self.lam,
            "adjusted": self.adjusted,
            "eta_hat": self.eta_hat,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.load_state_dict(state)
        self.ratio.copy_(state["ratio"])
        self.trusted.copy_(state["trusted"])
        self.lam = float(state["lam"])
        self.adjusted = bool(state["adjusted"])
        self.eta_hat = float(state["eta_hat"])
