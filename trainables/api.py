"""The contract between the training loop and the algorithms.

An algorithm is any object that satisfies :class:`Algorithm` (a Protocol, not a base class): the
loop builds it from the registry, calls ``train_epoch`` once per epoch, ``predict`` to evaluate,
and saves ``state_dict`` in every checkpoint. Algorithms never import ray or mlflow.

Data reaches an algorithm as a :class:`TrainData`: the training pool on the training device, the
label sets it learns from (candidate sets, or the singleton of a VLM's noisy label), the
annotator's probabilities for distillation methods, the few-shot trusted mask and the view makers
(weak / strong augmentation). Ground-truth labels are not in it: they stay in the loop, which uses
them only to compute reported metrics. What a method learns from is a :class:`Target` on its spec.

Optional protocols: :class:`TwoNetwork` (Co-Reg, DivideMix) lets the loop report each network's
accuracy beside the ensemble's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from trainables.data.annotation import Target
from trainables.data.clip_source import LoadedClip
from trainables.data.vlm_source import LoadedVlm
from trainables.settings import AlgorithmSpec, TrainSettings, starred_variant

__all__ = [
    "Algorithm", "AlgorithmSpec", "BuildContext", "Diagnosed", "Target", "TrainData", "TrainSettings",
    "TwoNetwork", "Views", "starred_variant",
]  # fmt: skip


@dataclass
class Views:
    """Makes network inputs from raw stored samples (uint8 images or float features).

    ``plain`` is the evaluation view (no augmentation); ``weak`` and ``strong`` are the two
    augmentation families of the papers (shift + flip; shift + flip + RandAugment + cutout).
    Every call draws its randomness from ``generator`` so that a seeded run is reproducible.
    """

    plain: Callable[[Tensor], Tensor]
    weak: Callable[[Tensor], Tensor]
    strong: Callable[[Tensor], Tensor]


@dataclass
class TrainData:
    """The training pool an algorithm learns from. Indexed by sample id ``0..N-1``.

    Attributes:
        x: stored samples, (N, C, H, W) uint8 images or (N, D) float features, on ``device``.
        cand: (N, C) float {0, 1} label sets: candidate sets (``Target.CAND``), or the singleton
            of the noisy label (the other kinds; for soft kinds the probabilities' argmax). Few-shot
            samples carry the singleton of their revealed label.
        trusted: (N,) bool, True for the few-shot samples whose label was revealed by a human.
        soft: (N, C) float annotator probabilities (trusted rows not overwritten) for the soft
            kinds (distillation), None otherwise.
        target: what ``cand`` / ``soft`` hold (the spec's ``consumes_for(params)``).
        views: makes plain / weak / strong network inputs from ``x[idx]``.
        generator: the CPU generator all shuffling uses.
    """

    x: Tensor
    cand: Tensor
    trusted: Tensor
    views: Views
    generator: torch.Generator
    soft: Tensor | None = None
    target: Target = Target.CAND

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return self.cand.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def batches(
        self,
        batch_size: int,
        indices: Tensor | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        """Yield index tensors (on the data device) covering ``indices`` (default: all samples)."""
        if indices is None:
            indices = torch.arange(self.num_samples)
        indices = indices.cpu()
        if shuffle:
            indices = indices[torch.randperm(len(indices), generator=self.generator)]
        stop = len(indices) - batch_size + 1 if drop_last else len(indices)
        for start in range(0, max(stop, 0), batch_size):
            yield indices[start : start + batch_size].to(self.device)


@dataclass
class BuildContext:
    """Everything an algorithm needs to build itself, besides its own hyperparameters."""

    num_classes: int
    num_samples: int
    make_encoder: Callable[[], nn.Module]
    """Returns a fresh feature extractor with an ``out_dim`` attribute (the backbone, no head)."""
    train: TrainSettings
    device: torch.device
    seed: int
    clip: LoadedClip | None = None
    """The annotator's CLIP, for a method that ``needs_clip`` (CoOp) and the ``clip_peft`` backbone;
    None for annotators without one."""
    vlm: LoadedVlm | None = None
    """The annotator's image-text-to-text model, for a method that ``needs_vlm`` (``vlm_lora``)."""


@runtime_checkable
class Algorithm(Protocol):
    """What the loop needs from an algorithm."""

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        """Train one epoch (0-based). Returns mean training losses keyed ``train/<name>``."""
        ...

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, C) for already-prepared (plain view) inputs."""
        ...

    def pseudo_labels(self) -> Tensor:
        """(N, C) current label distribution the method trains towards, per training sample."""
        ...

    def clean_mask(self) -> Tensor | None:
        """(N,) bool: samples the method currently treats as correctly labelled, or None."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimisers, schedulers and per-sample state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


@runtime_checkable
class TwoNetwork(Protocol):
    """Optional, for a method that trains two networks and predicts with their ensemble (Co-Reg,
    DivideMix): the loop also reports each network's own test accuracy (``test/acc_net_a``, ``_b``).
    ``predict(x)`` must equal ``logits_a + logits_b`` of :meth:`predict_nets`: the loop evaluates
    each test batch once through both nets and sums."""

    @torch.no_grad()
    def predict_nets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C) of net A and of net B for plain-view inputs."""
        ...


@runtime_checkable
class Diagnosed(Protocol):
    """Optional, for a method with an embedding or a queue: label-free collapse signals of its
    representation (``common/diagnostics.py``), logged per epoch as ``diag/<name>``."""

    @torch.no_grad()
    def diagnostics(self, probe: Tensor) -> dict[str, float]:
        """Signals on ``probe`` (B, ...), a fixed batch of plain-view training inputs (no labels)."""
        ...
