"""The optimiser every method uses: SGD with momentum and weight decay, scheduled per epoch."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

from trainables.api import TrainSettings
from trainables.common.schedules import make_scheduler


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    train: TrainSettings,
    epochs: int,
    *,
    eta_min_ratio: float = 0.0,
) -> tuple[torch.optim.SGD, LRScheduler]:
    """SGD(lr, momentum, weight_decay from ``train``) and its scheduler (``train.scheduler``).

    ``epochs`` is the cosine period; call ``scheduler.step()`` once at the end of every epoch.
    """
    optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return optimizer, make_scheduler(optimizer, train.scheduler, epochs, eta_min_ratio=eta_min_ratio)
