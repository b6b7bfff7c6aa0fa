"""Two classifiers trained side by side (Co-Reg, DivideMix): the bookkeeping both methods share.

:class:`TwoNets` holds nets A and B with their optimisers and schedules, takes the optimisation
step of one net, runs the warm-up batches of each net in turn, predicts with both nets and with
their ensemble (logits_A + logits_B), and writes the checkpoint keys ``net_a`` / ``net_b``,
``optimizer_a`` / ``optimizer_b``, ``scheduler_a`` / ``scheduler_b``. :func:`per_net_state` and
:func:`load_per_net` give any other per-net object (key nets, queues) the same ``<name>_a`` /
``<name>_b`` keys. What each method trains, and on which split, stays in its own file.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.nets import Net, seeded
from trainables.common.optim import make_optimizer

NET_NAMES = ("a", "b")
"""Suffix of each net's checkpoint keys and metric names, net A first."""


def per_net_state(name: str, objects: Sequence[Any]) -> dict[str, Any]:
    """``{<name>_a: objects[0].state_dict(), <name>_b: objects[1].state_dict()}``."""
    return {f"{name}_{s}": obj.state_dict() for s, obj in zip(NET_NAMES, objects)}


def load_per_net(state: dict[str, Any], name: str, objects: Sequence[Any]) -> None:
    """Load what :func:`per_net_state` saved under ``name`` into ``objects``."""
    for s, obj in zip(NET_NAMES, objects):
        obj.load_state_dict(state[f"{name}_{s}"])


def labeled_fraction(me: int, labeled: Tensor) -> dict[str, Tensor]:
    """``train/labeled_fraction_a`` / ``_b``: the share of samples in the labeled (clean) split net ``me`` trains on."""
    return {f"labeled_fraction_{NET_NAMES[me]}": labeled.float().mean()}


class CoTrainedPair:
    """The protocol methods of a method that holds a :class:`TwoNets` as ``self.pair`` and each
    net's latest training targets as ``self.targets`` (2, N, C) (Co-Reg, DivideMix): the
    ``api.TwoNetwork`` predictions of each net, the ensemble's prediction, and the two nets' mean
    target as pseudo-labels. No training logic: each method lists it as a base."""

    pair: "TwoNets"
    targets: Tensor

    def predict_nets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pair.predict_nets(x)

    def predict(self, x: Tensor) -> Tensor:
        return self.pair.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.targets.mean(dim=0)


class TwoNets:
    """Nets A and B (``nets.Net``), each with its own SGD optimiser and per-epoch schedule.

    Both nets are built under ``ctx.seed`` (A first), so their initial weights differ from each other
    but depend on the seed only. ``period`` is the cosine period (default ``training.epochs``) and
    ``eta_min_ratio`` its floor as a fraction of the initial learning rate.
    """

    def __init__(
        self, ctx: BuildContext, *, proj_dim: int | None, period: int | None = None, eta_min_ratio: float = 0.0
    ):
        with seeded(ctx.seed):
            self.nets = tuple(Net(ctx.make_encoder(), ctx.num_classes, proj_dim).to(ctx.device) for _ in NET_NAMES)
        period = period or ctx.train.epochs
        optim = [make_optimizer(net.parameters(), ctx.train, period, eta_min_ratio=eta_min_ratio) for net in self.nets]
        self.optimizers, self.schedulers = tuple(o for o, _ in optim), tuple(s for _, s in optim)

    @property
    def net_a(self) -> Net:
        return self.nets[0]

    @property
    def net_b(self) -> Net:
        return self.nets[1]

    def step(self, i: int, loss: Tensor) -> None:
        """One optimisation step of net ``i`` on ``loss``."""
        optimizer = self.optimizers[i]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def train_against(self, me: int) -> tuple[Net, Net]:
        """(net ``me`` in training mode, its peer in eval mode), as the references' ``net.train(); net2.eval()``."""
        net, peer = self.nets[me], self.nets[1 - me]
        net.train()
        peer.eval()
        return net, peer

    def warmup_batches(self, data: TrainData, batch_size: int) -> Iterator[tuple[int, Net, Tensor]]:
        """``(i, net_i, idx)``: net A over its own shuffle of the data, then net B over its own, in training mode."""
        for i, net in enumerate(self.nets):
            net.train()
            for idx in train_batches(data, batch_size):
                yield i, net, idx

    def end_epoch(self) -> float:
        """Advance both schedules; returns the learning rate the epoch used."""
        lr = self.optimizers[0].param_groups[0]["lr"]
        for scheduler in self.schedulers:
            scheduler.step()
        return lr

    @torch.no_grad()
    def predict_nets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C) of net A and of net B, in eval mode, for plain-view inputs."""
        self.net_a.eval()
        self.net_b.eval()
        return self.net_a(x), self.net_b(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The ensemble: logits_A + logits_B.  # (B, C)"""
        logits_a, logits_b = self.predict_nets(x)
        return logits_a + logits_b

    def state_dict(self) -> dict[str, Any]:
        return {
            **per_net_state("net", self.nets),
            **per_net_state("optimizer", self.optimizers),
            **per_net_state("scheduler", self.schedulers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_per_net(state, "net", self.nets)
        load_per_net(state, "optimizer", self.optimizers)
        load_per_net(state, "scheduler", self.schedulers)
