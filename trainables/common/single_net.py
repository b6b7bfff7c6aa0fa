"""One classifier with its optimiser and schedule: the part every single-network method shares.

Methods hold a :class:`SingleNet` by composition and keep their own per-sample state and loss; the
network, optimisation step, evaluation and the checkpoint keys ``net`` / ``optimizer`` /
``scheduler`` are written once here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trainables.api import BuildContext
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
