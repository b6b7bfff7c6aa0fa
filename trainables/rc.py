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
4. The importance weights ``conf`` (N, C) are per-sample state in ``state_dict`` and are what
   ``pseudo_labels()`` reports (uniform over all classes before the first epoch sees S). RC assumes
   every candidate set holds the true label, so ``clean_mask()`` is None.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.confidence import CandidateConfidence, ConfidenceTableMethod
from trainables.common.losses import soft_ce
from trainables.common.single_net import SingleNet, fit_epoch, training_view
from trainables.common.targets import restrict_to_candidates
from trainables.params.rc import RCParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


class RC(ConfidenceTableMethod):
    def __init__(self, params: RCParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.conf = CandidateConfidence(ctx.num_samples, ctx.num_classes, ctx.device)
        """(N, C) importance weights of the risk estimate: uniform on S at first, re-estimated after every epoch."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        self.conf.start(data.cand)
        metrics = fit_epoch(self.model, data, lambda idx: self.train_step(data, idx))
        self._update_confidences(data)  # once per epoch, with the end-of-epoch model
        return metrics

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        logits = self.model.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        return {"loss": soft_ce(logits, self.conf[idx]).mean()}  # the importance-reweighted risk

    @torch.no_grad()
    def _update_confidences(self, data: TrainData) -> None:
        """conf <- p restricted to S and renormalised, for every sample, from one eval-mode pass on plain views."""
        self.model.net.eval()
        for idx in data.batches(self.model.batch_size, shuffle=False):
            probs = F.softmax(self.model.net(data.views.plain(data.x[idx])), dim=1)  # (B, C)
            self.conf[idx] = restrict_to_candidates(probs, data.cand[idx])
