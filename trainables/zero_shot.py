"""Zero-shot: the annotator's own predictions, reported like a trained method.

Papers: A. Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021 (zero-shot classification with prompt templates); Co-Reg extended version,
Table I rows Zero-Shot and Zero-Shot* (train and test accuracy of the CLIP annotator). Reference:
Co-Reg's ``utils/utils_experi.py: clip_annotate`` (github.com/Portugas0807/Co-Reg) prints the same
accuracies per template and for the template average (as a mean of per-batch accuracies).

Nothing is trained. The prediction for a sample is the annotator's class probability vector of
template ``single_template`` ("a photo of a {}"), or the template average for Zero-Shot*
(``starred=True``), read from the stored annotation (``probs_train`` / ``probs_test``): test/acc is
the zero-shot test accuracy, pl/acc the zero-shot accuracy on the training samples, and
val/covering_rate is measured on the held-out samples' stored predictions.

Implementation details / deviations:
1. The loop builds it with the stored probabilities of the train / val / test samples in
   ``BuildContext.extras["annotator_probs"]`` (``AlgorithmSpec.reads_annotator_probs``; the template
   choice follows the target kind, ``noisy_label`` or ``noisy_label_avg``) and evaluates it through
   ``stored_logits(split)`` (``api.StoredPredictions``): there is no network, and ``predict`` on
   images is refused. ``trains=False`` makes the loop run one epoch; ``train_epoch`` does nothing.
2. The logits are log-probabilities, so the loop's softmax gives back the stored probabilities
   (renormalised after fp16 storage). Argmax ties resolve to the lowest class, as in the
   annotation statistics (``zs_acc_*``).
3. Few-shot revealed labels are ignored: zero-shot uses no label. Without stored probabilities
   (a rebuild from a checkpoint, which holds no state) it can be built but not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainables.api import AlgorithmSpec, BuildContext, TrainData

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ZeroShotParams:
    starred: bool = False
    """Zero-Shot*: the template-average prediction instead of template ``single_template``."""


class ZeroShot:
    def __init__(self, params: ZeroShotParams, ctx: BuildContext):
        self.params = params
        stored = ctx.extras.get("annotator_probs")
        self.probs: dict[str, Tensor] | None = None
        """(n, C) stored annotator probabilities per split, or None when built without them."""
        if stored is not None:
            if set(stored) != set(SPLITS):
                raise ValueError(f"annotator_probs must hold the splits {SPLITS}, got {sorted(stored)}")
            if stored["train"].shape != (ctx.num_samples, ctx.num_classes):
                raise ValueError(
                    f"annotator_probs['train'] has shape {tuple(stored['train'].shape)}, "
                    f"expected {(ctx.num_samples, ctx.num_classes)}"
                )
            self.probs = {split: probs.to(ctx.device, torch.float32) for split, probs in stored.items()}

    def _stored(self, split: str) -> Tensor:
        if self.probs is None:
            raise RuntimeError(
                "zero_shot was built without the annotator's stored probabilities "
                "(BuildContext.extras['annotator_probs']); only a CLIP annotation has them"
            )
        return self.probs[split]

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        return {}

    def stored_logits(self, split: str) -> Tensor:
        """log p of the stored prediction of every sample of ``split``.  # (n, C)"""
        return self._stored(split).clamp_min(1e-30).log()

    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError(
            "zero_shot has no network: its predictions are the annotator's stored probabilities, "
            "available per split through stored_logits(split)"
        )

    def pseudo_labels(self) -> Tensor:
        return self._stored("train").clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _consumes(params: ZeroShotParams) -> str:
    return "noisy_label_avg" if params.starred else "noisy_label"


SPEC = AlgorithmSpec(
    name="zero_shot",
    params=ZeroShotParams,
    build=ZeroShot,
    consumes="noisy_label",
    consumes_when=_consumes,
    reads_annotator_probs=True,
    trains=False,
    description="Zero-shot (Radford et al. 2021): the annotator's stored predictions, single template or average (*).",
)
