"""PRODEN: progressive identification of true labels.

Paper: J. Lv, M. Xu, L. Feng, G. Niu, X. Geng, M. Sugiyama, "Progressive Identification of True
Labels for Partial-Label Learning", ICML 2020. Reference code: github.com/lvjiaqi77/PRODEN
(``utils/utils_loss.py: partial_loss``, ``main.py``).

Each sample keeps a confidence vector ``conf`` over its candidate set, initialised uniform on S.
The classifier minimises the confidence-weighted cross-entropy L = -sum_j conf_j log p_j(x), and
after every mini-batch the confidences of that batch's samples are re-estimated as the model's
prediction restricted to S and renormalised: conf_j = p_j 1[j in S] / sum_{k in S} p_k.

Implementation details / deviations:
1. The confidence update uses the softmax of the same forward pass as the loss (before the
   optimiser step), exactly like the reference's ``partial_loss``.
2. Training uses the weak view (shift + flip) by default; the reference trains on un-augmented
   inputs (``augment=False`` does that).
3. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch, ``TrainSettings``);
   the reference uses SGD with a step schedule that is constant at its defaults.
4. ``conf`` (N, C) is explicit per-sample state, saved in ``state_dict``; ``pseudo_labels()``
   returns it (uniform over all classes until the first epoch has seen the candidate sets).
   ``clean_mask()`` is None: PRODEN assumes every candidate set holds the true label.
"""

from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.confidence import CandidateConfidence, ConfidenceTableMethod
from trainables.common.losses import soft_ce
from trainables.common.single_net import SingleNet, fit_epoch, training_view
from trainables.common.targets import restrict_to_candidates
from trainables.params.proden import PRODENParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


class PRODEN(ConfidenceTableMethod):
    def __init__(self, params: PRODENParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.conf = CandidateConfidence(ctx.num_samples, ctx.num_classes, ctx.device)
        """(N, C) confidences; set uniform on S by the first epoch (the candidate sets come with the data)."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        self.conf.start(data.cand)
        return fit_epoch(self.model, data, lambda idx: self.train_step(data, idx))

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        logits = self.model.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        loss = soft_ce(logits, self.conf[idx]).mean()
        # progressive identification, per batch: the confidences follow the prediction restricted to S
        self.conf[idx] = restrict_to_candidates(F.softmax(logits.detach(), dim=1), data.cand[idx])
        return {"loss": loss}
