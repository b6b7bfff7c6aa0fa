"""KD: unsupervised knowledge distillation of the annotator into a small student.

Papers: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015 (the
loss); Co-Reg extended version, Table I rows KD and KD* (the setting: the CLIP annotator is the
teacher, no label is used). No public reference code for this baseline exists in the Co-Reg
repository beyond its ``kd`` candidate mode (github.com/Portugas0807/Co-Reg,
``utils/utils_experi.py``), which hands the template-averaged probabilities to the student.

The student minimises T^2 KL(q_T || p_T) per sample, where q_T is the annotator's probability
vector softened with temperature T (q^(1/T), renormalised, i.e. the softmax of the teacher's
logits / T) and p_T = softmax(student logits / T). KD learns from the probabilities of template
``single_template`` ("a photo of a {}"), KD* (``starred=True``) from the template average.

Implementation details / deviations:
1. The teacher's probabilities are those the annotation stage stored (``data.soft``: fp16 CLIP
   probabilities renormalised); the teacher's logits are not stored, so the temperature acts on
   them through q^(1/T), which is the same thing. T = 1 (the default) is plain soft-label
   cross-entropy up to the teacher's entropy (a constant).
2. Few-shot trusted samples learn from their revealed label (the one-hot row of ``data.cand``)
   instead of the teacher; the paper's KD rows use none.
3. Training uses the weak view by default (``augment=False``: plain inputs); optimiser and
   schedule are the project's shared SGD + cosine (``TrainSettings``).
4. ``pseudo_labels()`` is the (softened) target the student trains towards, set on the first
   epoch; ``clean_mask()`` is None.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.losses import kl_div
from trainables.common.single_net import SingleNet, fit_epoch, training_view
from trainables.common.targets import sharpen
from trainables.params.kd import KDParams, SPEC  # noqa: F401  (SPEC: the registry entry, kept importable from here)


def distillation_loss(logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T^2 KL(q^(1/T) renormalised || softmax(logits / T)).  # (B,)"""
    target = sharpen(teacher_probs, temperature)
    return temperature**2 * kl_div(F.log_softmax(logits / temperature, dim=1), target)


def teacher_targets(data: TrainData) -> Tensor:
    """The annotator's probabilities, with the revealed label for trusted samples.  # (N, C)"""
    if data.soft is None:
        raise ValueError("kd needs the annotator's probabilities (TrainData.soft); only a CLIP annotation has them")
    return torch.where(data.trusted[:, None], data.cand, data.soft)


class KD:
    def __init__(self, params: KDParams, ctx: BuildContext):
        self.params = params
        self.model = SingleNet(ctx)
        self.targets = torch.full((ctx.num_samples, ctx.num_classes), 1.0 / ctx.num_classes, device=ctx.device)
        """(N, C) softened teacher targets; filled on the first epoch (the probabilities come with the data)."""
        self.initialised = False

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        teacher = teacher_targets(data)  # (N, C)
        if not self.initialised:
            self.targets.copy_(sharpen(teacher, self.params.temperature))
            self.initialised = True
        return fit_epoch(self.model, data, lambda idx: self.train_step(data, idx, teacher[idx]))

    def train_step(self, data: TrainData, idx: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        logits = self.model.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        return {"loss": distillation_loss(logits, teacher, self.params.temperature).mean()}

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.targets.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**self.model.state_dict(), "targets": self.targets.clone(), "initialised": self.initialised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.targets.copy_(state["targets"])
        self.initialised = bool(state["initialised"])
