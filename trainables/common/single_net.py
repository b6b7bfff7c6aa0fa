"""One classifier with its optimiser and schedule: the part every single-network method shares.

Methods hold a :class:`SingleNet` by composition and keep their own per-sample state and loss; the
network, optimisation step, evaluation and the checkpoint keys ``net`` / ``optimizer`` /
``scheduler`` are written once here. :func:`fit_epoch` is the epoch of a method whose batches are
independent (USB's ``train_step`` shape): the method writes ``train_step(idx) -> losses`` in the
order of its paper's equations, the epoch around it (shuffled batches, optimiser and schedule
steps, the means of the reported losses) is written once. :func:`training_view` is the
``augment`` switch of the baselines that the papers train on un-augmented inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.metrics import MeanMeter
from trainables.common.nets import Net, seeded
from trainables.common.optim import make_optimizer


class SingleNet:
    """A ``nets.Net`` with its optimiser and schedule.

    ``proj_dim`` also builds the projection head (PiCO's ``ContrastiveClassifier``); None, the classifier only.
    """

    def __init__(self, ctx: BuildContext, proj_dim: int | None = None):
        with seeded(ctx.seed):
            self.net = Net(ctx.make_encoder(), ctx.num_classes, proj_dim=proj_dim).to(ctx.device)
        self.optimizer, self.scheduler = make_optimizer(self.net.parameters(), ctx.train, ctx.train.epochs)
        self.batch_size = ctx.train.batch_size

    def step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def end_epoch(self) -> float:
        """Advance the per-epoch schedule; returns the learning rate the epoch used."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return lr

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.net.eval()
        return self.net(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


TrainStep = Callable[[Tensor], dict[str, Tensor]]
"""``train_step(idx) -> {"loss": ..., <other reported terms>}`` for one batch of sample ids; ``loss``
is the one optimised. Per-sample state it updates from the batch's (detached) predictions may be
written before the optimiser step: the loss holds its own copy of the rows it read."""


def fit_epoch(model: SingleNet, data: TrainData, train_step: TrainStep) -> dict[str, float]:
    """One epoch of ``model`` in training mode: ``train_step`` then one optimiser step per shuffled
    batch, then the schedule step. Returns the mean of every reported term (``train/<name>``) and
    the learning rate the epoch used (``train/lr``)."""
    model.net.train()
    meter = MeanMeter()
    for idx in train_batches(data, model.batch_size):
        losses = train_step(idx)
        model.step(losses["loss"])
        meter.add(**losses)
    return {**meter.means("train/"), "train/lr": model.end_epoch()}


def training_view(data: TrainData, augment: bool) -> Callable[[Tensor], Tensor]:
    """The weak view (shift + flip) when ``augment``, else the plain one (the papers' un-augmented inputs)."""
    return data.views.weak if augment else data.views.plain
