"""ALIM: adjusting label importance on top of PiCO; two variants, ALIM-Onehot and ALIM-Scale.

Paper: M. Xu, Z. Lian, L. Feng, B. Liu, J. Tao, "ALIM: Adjusting Label Importance Mechanism for
Noisy Partial Label Learning", NeurIPS 2023 (poster: ``alim-poster.txt``, Eq. 1-2 and 6).
Reference code: github.com/zeroQiaoba/ALIM (``train_merge.py``, ``pll_model.py``,
``utils/utils_loss.py: partial_loss.confidence_update``, ``example.sh``).

PiCO (``pico.py``) where the candidate set is softened to S~ = S + lambda (1 - S): the pseudo
class that moves the prototypes and labels the SupCon queue is argmax(S~ * p) of the classifier,
and the pseudo-label moves towards w = Normalize(S~ * P), P the prototype similarity
softmax(q . o / 0.07) (reference ``proto_type=cluster``): conf <- phi conf + (1 - phi) w (poster
Eq. 2). ALIM-Onehot (``alim_onehot``, reference ``proto_case=Case1``): Normalize = one-hot of the
argmax. ALIM-Scale (``alim_scale``, ``proto_case=Case3``): Scale(z)_i = z_i^(1/K) / sum_j z_j^(1/K),
K the weight of the entropy term of the poster's objective (K = 0 gives Onehot). lambda = 0 until
``lambda_start`` (e0); then, at the end of each epoch, lambda is either ``lam``
(``lambda_mode="fixed"``) or the eta-quantile over the training set of the ratios
max_{j in S} P_j / max_{j not in S} P_j seen during the epoch, capped at 1 (``lambda_mode="adaptive"``,
poster Eq. 6, reference ``piror_auto=case1`` with ``--max1``). lambda = 0 trusts S fully (PiCO /
PRODEN); lambda = 1 ignores it. Loss: CE(p, conf) + 0.5 SupCon + ``mixup_weight`` CE(p(mixed x), mixed conf).

Implementation details / deviations:
1. Composition, not a copy of PiCO's loop: each batch goes through PiCO's ``encode_batch`` and
   ``contrastive_loss`` (``pico.py``) with ALIM's pseudo class argmax(S~ * p); ALIM's own parts are
   the target w, the ratio record, the MixUp term and the end-of-epoch lambda.
2. eta is estimated, not given: the reference uses the true noise rate (``--noise_rate``) unless
   ``--noise_rate_estimate`` is set. Here eta_hat is the mass of the low component of a 2-GMM on
   log(ratio) over the epoch (:func:`estimate_noise_rate`): a label outside S gives a prediction
   outside S, i.e. a negative log-ratio. ``eta_scale`` multiplies the estimate (searched);
   ``eta_hint`` replaces it with a user-given eta. The fraction of samples whose prediction leaves S
   would not do: its quantile is always the smallest ratio >= 1, i.e. lambda = 1.
3. ``lambda_start`` = 5 for the project's short runs (reference e0 = 80 of 1000 epochs; 140 for
   CIFAR-10 q = 0.5). ``lam`` = 0.5 for the fixed mode is the middle of the range, not a paper value.
4. ALIM-Scale's ``scale_k`` = 1: the reference's Case3 renormalises S~ * P without a power (K = 1);
   K acts like a temperature on P (P^(1/K) = softmax(q . o / (0.07 K))) except for the
   lambda^(1/K) factor. With lambda = 0 and K = 1 the target is P restricted to S (RC / PRODEN, as
   the poster notes).
5. No warm-up (``warmup_epochs`` = 0), as the reference (``--proto_start 1`` on 1-based epochs):
   disambiguation and SupCon run from the first epoch. With ``warmup_epochs`` > 0 the first epochs
   train as PiCO's warm-up (uniform conf, MoCo; MixUp stays on) and the contrast set restarts
   from the query net when it ends (``restart_at_switch``, as PiCO's deviation 6).
6. MixUp is on (reference ``--loss_weight_mixup 1``, the paper's heart rows; 0 gives the diamond
   rows): the query view mixed with a random permutation of its batch (the reference mixes with
   a second, independently shuffled batch), lambda ~ Beta(4, 4), max(l, 1 - l).
7. Few-shot trusted samples keep lambda = 0 (a revealed label is never left) and are left out of
   the quantile and the eta estimate.
8. The ratio uses the prototype P of each batch before its prototype update, as the reference's
   ``margin``; its epsilon (1e-9) too. The quantile is sorted(ratio)[int(N eta)].
9. As in ``pico.py``: query = weak view, key = strong view, phi 0.95 -> 0.8 linearly, empty initial
   queue, the project's optimiser and schedule (reference: SGD lr 0.01, wd 1e-3).
10. The reference reports the best test accuracy over epochs (test-set model selection); the loop
    reports the last epoch and a label-free selected epoch instead.
11. ``pseudo_labels()`` = conf; ``clean_mask()`` = samples whose ratio is >= lambda (S still wins,
    the poster's clean/noisy boundary) plus trusted ones, None before lambda is first set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.confidence import CandidateConfidence
from trainables.common.gmm import clean_probability
from trainables.common.losses import soft_ce
from trainables.common.metrics import MeanMeter
from trainables.common.mixup import mixup_ce
from trainables.common.pico import ContrastiveClassifier, at_switch, moving_average, phi_at
from trainables.pico import contrastive_loss, encode_batch
from trainables.params.alim import ALIMParams, ALIMScaleParams, ONEHOT_SPEC, SCALE_SPEC, SPECS  # noqa: F401  (SPEC: the registry entry, kept importable from here)

NORMALISATIONS = ("onehot", "scale")
LAMBDA_MODES = ("adaptive", "fixed")
RATIO_EPS = 1e-9
"""Added to the denominator of the ratio, as in the reference (``1e-9 + max(...)``)."""


# -- ALIM's pieces (poster Eq. 1-2 and 6) ---------------------------------------------------------


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
    """ALIM on top of PiCO's pieces (the reference ``train_merge.py``); ``normalise`` and ``k`` pick the variant."""

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
        if at_switch(epoch, p.warmup_epochs, p.restart_at_switch):
            model.restart_contrast()
        phi = phi_at(epoch, self.epochs, p.phi_start, p.phi_end)
        model.train_mode()
        meter = MeanMeter()
        for idx in train_batches(data, self.batch_size):
            lam = torch.where(data.trusted[idx], 0.0, self.lam)[:, None]  # (B, 1): a revealed label stays
            batch = encode_batch(
                model, data, idx, temperature=p.proto_temperature, proto_momentum=p.proto_momentum,
                pseudo_class=lambda probs, cand: (relaxed_candidates(cand, lam) * probs).argmax(dim=1),
            )  # fmt: skip
            self.ratio[idx] = candidate_ratio(batch.scores, batch.cand)  # poster Eq. 6, P before the update
            if updating:
                target = alim_target(batch.scores, batch.cand, lam, self.normalise, self.k)  # poster Eq. 2
                self.conf[idx] = moving_average(self.conf[idx], target, phi)
            loss_cont = contrastive_loss(model, batch, p.temperature, supervised=updating)
            targets = self.conf[idx]  # (B, C)
            loss_cls = soft_ce(batch.logits, targets).mean()
            loss = loss_cls + p.cont_weight * loss_cont
            if p.mixup_weight > 0:
                loss_mix = mixup_ce(model.net, batch.x_q, targets, p.mix_alpha, data.generator)
                loss = loss + p.mixup_weight * loss_mix
                meter.add(loss_mix=loss_mix)
            model.step(loss)
            model.enqueue_all(batch.k, batch.labels)
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

    def diagnostics(self, probe: Tensor) -> dict[str, float]:
        return self.model.diagnostics(probe)

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


def build_onehot(params: ALIMParams, ctx: BuildContext) -> ALIM:
    return ALIM(params, ctx, normalise="onehot")


def build_scale(params: ALIMScaleParams, ctx: BuildContext) -> ALIM:
    return ALIM(params, ctx, normalise="scale", k=params.scale_k)
