"""CR-DPLL: consistency regularisation for deep partial label learning.

Paper: D.-D. Wu, D.-B. Wang, M.-L. Zhang, "Revisiting Consistency Regularization for Deep Partial
Label Learning", ICML 2022. Reference code: github.com/wu-dd/PLCR (``main.py: DPLL_train,
confidence_update``; ``cifar.py`` for the three views; ``dataset.py``).

Each sample keeps a confidence vector ``conf`` over its candidate set S (uniform on S at the start).
Every mini-batch sees three views of each sample: the original (weak: shift + flip) and two strong
augmentations. The loss is

    L = lambda(t) * sum_{v=0..2} KL(conf || p_v)  +  ( -sum_{j not in S} log(1 - p_0j) ),

a consistency term (``train/loss_consistency``) pulling every view towards the shared confidence,
and a supervised term (``train/loss_supervised``) pushing the probability of every non-candidate
label to zero. lambda(t) = lam * min(t / T', 1) ramps up linearly in the epoch t. Each batch's
confidences then become the normalised geometric mean of the three views' predictions restricted
to S:
conf_j = 1[j in S] prod_v p_vj^(1/3) / sum_{k in S} prod_v p_vk^(1/3) (no moving average).

Implementation details / deviations:
1. The supervised non-candidate term uses the original view only and the reference's
   ``log(1.0000001 - p)`` (``main.py``: ``super_loss`` on ``y_pred_aug0``); the three KL terms
   are summed, not averaged, and each is ``KLDivLoss(reduction="batchmean")``: summed over classes,
   averaged over the batch.
2. Ramp: the reference ramps over T' = 100 of its 200 epochs (``lam = min(epoch / 100 * lam,
   lam)``, 0-based epochs, so the first epoch trains on the supervised term only). Our runs are
   much shorter, so T' is a fraction of ``training.epochs``: ``rampup_fraction`` (default 0.5 =
   100 / 200 of the reference schedule).
3. The confidence update uses the softmax of the same three forward passes as the loss (detached,
   before the optimiser step), as the reference does; it is computed in log space (mean of the
   log-probabilities), which equals the reference's product of cube roots.
4. The three views are three separate forward passes (BatchNorm normalises each view on its own),
   as in the reference. Strong views are the project's RandAugment + Cutout
   (``common/augment.py``); the reference uses Cutout then AutoAugment's CIFAR-10 policy.
5. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch,
   ``TrainSettings``); the reference uses SGD lr 0.1, weight decay 1e-4, steps at epochs 100 and
   150 of 200, batch size 64.
6. CR-DPLL assumes the true label is in S (plain PLL): the confidence never leaves S, so noisy
   sets are not corrected. ``clean_mask()`` is None; ``pseudo_labels()`` returns ``conf``
   (uniform over all classes until the first epoch has seen the candidate sets).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.confidence import CandidateConfidence, ConfidenceTableMethod, geometric_mean_on_candidates
from trainables.common.losses import kl_div
from trainables.common.schedules import linear_ramp
from trainables.common.single_net import SingleNet, fit_epoch
from trainables.params.cr_dpll import CRDPLLParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)

NON_CANDIDATE_EPS = 1e-7
"""The reference's ``log(1.0000001 - p)``: keeps the log finite when p reaches 1."""


def non_candidate_nll(logits: Tensor, cand: Tensor) -> Tensor:
    """-sum_{j not in S} log(1 - p_j): the supervised term of CR-DPLL.  # (B,)"""
    probs = F.softmax(logits, dim=1)
    return -((1.0 - cand) * torch.log(1.0 + NON_CANDIDATE_EPS - probs)).sum(dim=1)


class CRDPLL(ConfidenceTableMethod):
    def __init__(self, params: CRDPLLParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.rampup_epochs = params.rampup_fraction * ctx.train.epochs
        self.conf = CandidateConfidence(ctx.num_samples, ctx.num_classes, ctx.device)
        """(N, C) the confidence all three views are pulled towards; uniform on S at the first epoch's start."""

    def consistency_weight(self, epoch: int) -> float:
        """lambda(t) = lam * min(t / T', 1)."""
        return self.params.lam * linear_ramp(epoch, self.rampup_epochs)

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        self.conf.start(data.cand)
        lam = self.consistency_weight(epoch)
        metrics = fit_epoch(self.model, data, lambda idx: self.train_step(data, idx, lam))
        return {**metrics, "train/lambda": lam}

    def train_step(self, data: TrainData, idx: Tensor, lam: float) -> dict[str, Tensor]:
        x, cand, conf = data.x[idx], data.cand[idx], self.conf[idx]
        views = (data.views.weak, data.views.strong, data.views.strong)
        logits = torch.stack([self.model.net(view(x)) for view in views])  # (3, B, C): original, strong 1, strong 2
        log_probs = F.log_softmax(logits, dim=2)

        consistency = sum(kl_div(log_probs[v], conf).mean() for v in range(len(views)))
        supervised = non_candidate_nll(logits[0], cand).mean()
        loss = lam * consistency + supervised

        # confidence = normalised geometric mean of the three views on S (no moving average)
        self.conf[idx] = geometric_mean_on_candidates(log_probs.detach().exp(), cand)
        return {"loss": loss, "loss_consistency": consistency, "loss_supervised": supervised}
