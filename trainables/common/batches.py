"""Mini-batch index iterators on top of :meth:`TrainData.batches` for training loops."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from trainables.api import TrainData


def eval_batch_size(device: torch.device) -> int:
    """Batch size of forward-only passes (evaluation, the division pass): large batches fill a GPU;
    on a CPU a batch of 128 keeps the activations in cache (the small CNN on 28x28 images runs a
    1000-image pass about 2x faster than at 1024, one thread)."""
    return 1024 if device.type == "cuda" else 128


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


def split_batches(
    data: TrainData, batch_size: int, labeled: Tensor, *, use_unlabeled: bool = True
) -> Iterator[tuple[Tensor, Tensor, float]]:
    """``(idx_x, idx_u, done)`` over one pass of the labeled split X = ``labeled`` (N,) bool.

    Each shuffled batch of X comes with the next batch of the unlabeled split U = ~labeled (cycled,
    empty when U has fewer than two samples or ``use_unlabeled`` is False) and the fraction of the
    pass done before it, it / ceil(|X| / B) (the per-iteration ramps of DivideMix and Co-Reg).
    """
    x_idx = labeled.nonzero().flatten()
    u_idx = (~labeled).nonzero().flatten() if use_unlabeled else x_idx[:0]
    u_batches = cycle_batches(data, batch_size, u_idx)
    num_iters = max(math.ceil(len(x_idx) / batch_size), 1)
    for it, idx_x in enumerate(train_batches(data, batch_size, x_idx)):
        yield idx_x, next(u_batches), it / num_iters
