"""LWS and LWC: the leveraged weighted loss, with the sigmoid loss (LWS) or the logistic loss (LWC).

Paper: H. Wen, J. Cui, H. Hang, J. Liu, Y. Wang, Z. Lin, "Leveraged Weighted Loss for Partial Label
Learning", ICML 2021. Reference code: github.com/hongwei-wen/LW-loss-for-partial-label
(``utils/utils_loss.py: lws_loss``, ``utils/utils_algo.py: confidence_update_lw``).

Each sample keeps loss weights w in two parts: ``conf`` (N, C), a distribution over its candidate
set S, and ``conf_out`` (N, C), a distribution over the non-candidates. The loss on the raw logits f
is (Eq. 6) L = sum_{j in S} w_j psi(f_j) + beta sum_{j not in S} w_j psi(-f_j), with the sigmoid
loss psi(z) = sigmoid(-z) for LWS (``lws``) or the logistic loss psi(z) = log(1 + exp(-z)) for LWC
(``lwc``); beta leverages the non-candidate term against the candidate one. After every mini-batch
the weights of that batch are re-estimated from the model's softmax p: restricted to S and
renormalised on the candidates, restricted to the complement and renormalised on the others.

Implementation details / deviations:
1. The reference release implements only the sigmoid variant (LWS); LWC swaps psi for the logistic
   loss on each logit (one-vs-rest) in the same :func:`leveraged_weighted_loss`.
2. The weight update uses the softmax of the same forward pass as the loss (detached, before the
   optimiser step); the reference re-runs the model on the batch after the step.
3. Weights start uniform on S and uniform on the complement; the reference starts from 1/C on every
   class and reaches this normalisation only after a sample's first update.
4. ``beta`` defaults to 1 for both, the reference's setting for CIFAR-10-like low-ambiguity cases
   (its parameter notes use 1 to 4 depending on the data and the flip rate q; its argparse default
   is 0). The weight of the candidate term is fixed to 1 (the reference's ``lw0`` default).
5. Training uses the weak view (shift + flip) by default; the reference trains on un-augmented
   inputs (``augment=False`` does that).
6. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch, ``TrainSettings``);
   the reference uses SGD with an exponential step decay.
7. ``pseudo_labels()`` returns ``conf``, the candidate part of the weights (uniform over all classes
   until the first epoch has seen the candidate sets); ``clean_mask()`` is None because LWS / LWC do
   not separate clean from noisy samples. Both parts are saved in ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.single_net import SingleNet, fit_epoch, training_view
from trainables.common.targets import restrict_to_candidates
from trainables.params.lw import LWC_SPEC, LWParams, LWS_SPEC, SPECS  # noqa: F401  (SPEC: the registry entry, kept importable from here)

PSI = ("sigmoid", "logistic")
"""The binary loss on each logit: LWS's sigmoid loss, LWC's logistic loss."""


def leveraged_weighted_loss(
    logits: Tensor, cand: Tensor, weights: Tensor, *, beta: float, psi: str = "sigmoid"
) -> Tensor:
    """Leveraged weighted loss (Eq. 6).  # (B,)

    L = sum_{j in S} w_j psi(f_j) + beta sum_{j not in S} w_j psi(-f_j) on the raw logits f, with
    psi(z) = sigmoid(-z) (``sigmoid``, LWS) or psi(z) = log(1 + exp(-z)) = softplus(-z)
    (``logistic``, LWC). ``weights`` (B, C) are treated as constants (the caller detaches them).
    """
    if psi == "sigmoid":
        pos, neg = torch.sigmoid(-logits), torch.sigmoid(logits)  # psi(f), psi(-f)
    elif psi == "logistic":
        pos, neg = F.softplus(-logits), F.softplus(logits)
    else:
        raise ValueError(f"unknown psi {psi!r}; allowed: {', '.join(PSI)}")
    on_candidates = (weights * cand * pos).sum(dim=1)
    off_candidates = (weights * (1.0 - cand) * neg).sum(dim=1)
    return on_candidates + beta * off_candidates


class LW:
    """One network, per-sample weights on S and off S; ``psi`` picks LWS (``sigmoid``) or LWC (``logistic``)."""

    def __init__(self, params: LWParams, ctx: BuildContext, psi: str):
        if psi not in PSI:
            raise ValueError(f"unknown psi {psi!r}; allowed: {', '.join(PSI)}")
        self.params, self.psi = params, psi
        self.model = SingleNet(ctx)
        self.conf = torch.full((ctx.num_samples, ctx.num_classes), 1.0 / ctx.num_classes, device=ctx.device)
        """(N, C) weights on S (a distribution over S); set uniform on S by the first epoch."""
        self.conf_out = torch.zeros(ctx.num_samples, ctx.num_classes, device=ctx.device)
        """(N, C) weights on the non-candidates (a distribution over them, or zeros if there are none)."""
        self.initialised = False

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        if not self.initialised:
            self._update_weights(torch.ones_like(data.cand), data.cand, slice(None))  # uniform on S, off S
            self.initialised = True
        return fit_epoch(self.model, data, lambda idx: self.train_step(data, idx))

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        cand = data.cand[idx]  # (B, C)
        logits = self.model.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        weights = self.conf[idx] + self.conf_out[idx]  # (B, C)
        loss = leveraged_weighted_loss(logits, cand, weights, beta=self.params.beta, psi=self.psi).mean()  # Eq. 6
        self._update_weights(F.softmax(logits.detach(), dim=1), cand, idx)
        return {"loss": loss}

    def _update_weights(self, probs: Tensor, cand: Tensor, idx: Tensor | slice) -> None:
        """The weights follow ``probs``, renormalised separately on S and off S (reference ``confidence_update_lw``)."""
        self.conf[idx] = restrict_to_candidates(probs, cand)
        self.conf_out[idx] = restrict_to_candidates(probs, 1.0 - cand)

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.model.state_dict(),
            "conf": self.conf.clone(),
            "conf_out": self.conf_out.clone(),
            "initialised": self.initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.copy_(state["conf"])
        self.conf_out.copy_(state["conf_out"])
        self.initialised = bool(state["initialised"])


def build_lws(params: LWParams, ctx: BuildContext) -> LW:
    return LW(params, ctx, psi="sigmoid")


def build_lwc(params: LWParams, ctx: BuildContext) -> LW:
    return LW(params, ctx, psi="logistic")
