"""CC: classifier-consistent partial-label learning.

Paper: L. Feng, J. Lv, B. Han, M. Xu, G. Niu, X. Geng, B. An, M. Sugiyama, "Provably Consistent
Partial-Label Learning", NeurIPS 2020. Reference code: the authors' ``main.py -lo cc`` release
(RC/CC), mirrored for example in github.com/zonszer/DualCoOp under ``RCCC/``.

The loss is the negative log of the probability mass the model puts on the candidate set,
L = -log sum_{j in S} p_j(x): minimising it makes the classifier consistent under the uniform
candidate-generation model of the paper.

Implementation details / deviations:
1. The loss is computed in log space (logsumexp of the candidate logits minus logsumexp of all
   logits) instead of ``-log((softmax * S).sum())``; same value, no underflow.
2. Training uses the weak view (shift + flip) by default; the paper trains on un-augmented inputs
   (``augment=False`` does that).
3. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch, ``TrainSettings``);
   the reference uses Adam with a constant learning rate.
4. ``pseudo_labels()`` is the model's latest prediction on each sample restricted to S and
   renormalised, recorded during training (CC itself keeps no per-sample state); ``clean_mask()`` is
   None because CC does not separate clean from noisy samples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.losses import partial_ce
from trainables.common.single_net import SingleNet, fit_epoch, training_view
from trainables.common.targets import restrict_to_candidates
from trainables.params.cc import CCParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


class CC:
    def __init__(self, params: CCParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.probs = torch.full((ctx.num_samples, ctx.num_classes), 1.0 / ctx.num_classes, device=ctx.device)
        """(N, C) latest prediction of each sample restricted to S (for reporting only)."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        return fit_epoch(self.model, data, lambda idx: self.train_step(data, idx))

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        cand = data.cand[idx]  # (B, C)
        logits = self.model.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        self.probs[idx] = restrict_to_candidates(F.softmax(logits.detach(), dim=1), cand)  # reported only
        return {"loss": partial_ce(logits, cand).mean()}  # -log sum_{j in S} p_j

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.probs.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.model.state_dict(),
            "probs": self.probs.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.probs.copy_(state["probs"])
