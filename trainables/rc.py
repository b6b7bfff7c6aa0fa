"""RC: risk-consistent partial-label learning.

Paper: L. Feng, J. Lv, B. Han, M. Xu, G. Niu, X. Geng, B. An, M. Sugiyama, "Provably Consistent
Partial-Label Learning", NeurIPS 2020. Reference code: the authors' (Feng et al.) RC/CC release
(``utils_loss.py: rc_loss``, ``utils_algo.py: confidence_update``).

Each sample keeps a confidence vector ``conf`` over its candidate set, initialised uniform on S.
The classifier minimises the importance-reweighted cross-entropy L = -sum_j conf_j log p_j(x), an
estimate of the ordinary classification risk; once per epoch the confidences are re-estimated as
the model's prediction restricted to S and renormalised: conf_j = p_j 1[j in S] / sum_{k in S} p_k.

Implementation details / deviations:
1. Confidences change only at the end of an epoch, from one evaluation-mode pass over the whole
   training pool on plain views (no augmentation, BatchNorm running statistics): every mini-batch of
   an epoch trains towards the same targets. This per-epoch schedule is what separates RC from
   PRODEN in this project (notes/methods.md); the released code instead re-runs the model on each
   mini-batch after its optimiser step and updates that batch's confidences at once.
2. Training uses the weak view (shift + flip) by default; the paper trains on un-augmented inputs
   (``augment=False`` does that).
3. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch, ``TrainSettings``);
   the reference uses Adam (or SGD in some scripts) with a constant or step-decayed learning rate.
4. ``conf`` (N, C) is explicit per-sample state, saved in ``state_dict``; ``pseudo_labels()``
   returns it (uniform over all classes until the first epoch has seen the candidate sets).
   ``clean_mask()`` is None: RC assumes every candidate set holds the true label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import AlgorithmSpec, BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.confidence import CandidateConfidence
from trainables.common.losses import soft_ce
from trainables.common.single_net import SingleNet
from trainables.common.targets import restrict_to_candidates


@dataclass(frozen=True)
class RCParams:
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the paper does."""


class RC:
    def __init__(self, params: RCParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.net, self.batch_size = self.model.net, self.model.batch_size
        self.conf = CandidateConfidence(ctx.num_samples, ctx.num_classes, ctx.device)
        """(N, C) confidences; set uniform on S by the first epoch (the candidate sets come with the data)."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        self.conf.start(data.cand)
        self.net.train()
        view = data.views.weak if self.params.augment else data.views.plain
        total, steps = 0.0, 0
        for idx in train_batches(data, self.batch_size):
            logits = self.net(view(data.x[idx]))  # (B, C)
            loss = soft_ce(logits, self.conf[idx]).mean()

            self.model.step(loss)
            total, steps = total + loss.item(), steps + 1
        lr = self.model.end_epoch()
        self._update_confidences(data)
        return {"train/loss": total / max(steps, 1), "train/lr": lr}

    @torch.no_grad()
    def _update_confidences(self, data: TrainData) -> None:
        """conf <- p restricted to S and renormalised, for every sample, with the end-of-epoch model."""
        self.net.eval()
        for idx in data.batches(self.batch_size, shuffle=False):
            probs = F.softmax(self.net(data.views.plain(data.x[idx])), dim=1)  # (B, C)
            self.conf[idx] = restrict_to_candidates(probs, data.cand[idx])

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.table.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**self.model.state_dict(), **self.conf.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.load_state_dict(state)


SPEC = AlgorithmSpec(
    name="rc",
    params=RCParams,
    build=RC,
    consumes="cand",
    description="RC (Feng et al. 2020): confidence-weighted CE, confidences re-estimated per epoch on S.",
)
