"""The training of the leveraged weighted loss (Wen et al., ICML 2021), shared by ``lws`` and ``lwc``.

The two methods differ only in the binary loss psi applied to each logit (``losses.LW_PSI``); their
modules hold the hyperparameters, the documentation and the registry entry, and build this class by
composition with their psi.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import BuildContext, TrainData
from trainables.common.batches import train_batches
from trainables.common.losses import leveraged_weighted_loss
from trainables.common.single_net import SingleNet
from trainables.common.targets import restrict_to_candidates


class LeveragedWeighted:
    """LWS / LWC training: one network, per-sample weights on S and off S (``psi`` picks the variant)."""

    def __init__(self, params: Any, ctx: BuildContext, psi: str):
        self.params, self.psi = params, psi
        self.model = SingleNet(ctx)
        self.net, self.batch_size = self.model.net, self.model.batch_size
        self.conf = torch.full((ctx.num_samples, ctx.num_classes), 1.0 / ctx.num_classes, device=ctx.device)
        """(N, C) weights on S (a distribution over S); set uniform on S by the first epoch."""
        self.conf_out = torch.zeros(ctx.num_samples, ctx.num_classes, device=ctx.device)
        """(N, C) weights on the non-candidates (a distribution over them, or zeros if there are none)."""
        self.initialised = False

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        if not self.initialised:
            ones = torch.ones_like(data.cand)
            self.conf.copy_(restrict_to_candidates(ones, data.cand))
            self.conf_out.copy_(restrict_to_candidates(ones, 1.0 - data.cand))
            self.initialised = True
        self.net.train()
        view = data.views.weak if self.params.augment else data.views.plain
        total, steps = 0.0, 0
        for idx in train_batches(data, self.batch_size):
            cand = data.cand[idx]  # (B, C)
            logits = self.net(view(data.x[idx]))  # (B, C)
            weights = self.conf[idx] + self.conf_out[idx]  # (B, C)
            loss = leveraged_weighted_loss(logits, cand, weights, beta=self.params.beta, psi=self.psi).mean()

            self.model.step(loss)

            # weights follow the current prediction, renormalised separately on S and off S
            probs = F.softmax(logits.detach(), dim=1)
            self.conf[idx] = restrict_to_candidates(probs, cand)
            self.conf_out[idx] = restrict_to_candidates(probs, 1.0 - cand)
            total, steps = total + loss.item(), steps + 1
        lr = self.model.end_epoch()
        return {"train/loss": total / max(steps, 1), "train/lr": lr}

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.model.state_dict(),
            "conf": self.conf.clone(),
            "conf_out": self.conf_out.clone(),
            "initialised": self.initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.copy_(state["conf"])
        self.conf_out.copy_(state["conf_out"])
        self.initialised = bool(state["initialised"])

