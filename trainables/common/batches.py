"""Mini-batch index iterators on top of :meth:`TrainData.batches` for training loops."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from trainables.api import TrainData


def train_batches(data: TrainData, batch_size: int, indices: Tensor | None = None) -> Iterator[Tensor]:
    """Shuffled batches covering ``indices``; a trailing batch of one sample is skipped.

    BatchNorm cannot normalise a single sample whose feature map is 1x1 (PreAct ResNet on 8x8
    inputs); the skipped sample is in a different position after the next shuffle.
    """
    for idx in data.batches(batch_size, indices):
        if len(idx) >= 2:
            yield idx


def cycle_batches(data: TrainData, batch_size: int, indices: Tensor) -> Iterator[Tensor]:
    """Endless shuffled batches over ``indices``, reshuffled at every pass (DivideMix's unlabeled loader).

    Yields empty index tensors when fewer than two indices are given.
    """
    if len(indices) < 2:
        empty = torch.empty(0, dtype=torch.long, device=data.device)
        while True:
            yield empty
    while True:
        yield from train_batches(data, batch_size, indices)
