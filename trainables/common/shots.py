"""The labels of a few-shot method (CoOp, ``vlm_lora``): the cell's revealed shots and nothing else."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trainables.api import TrainData


class RevealedShots:
    """Which training samples are revealed shots and their labels: ``targets`` (N, C) is the revealed
    label on a shot and uniform elsewhere (the method's ``pseudo_labels``), ``mask`` (N,) marks the
    shots (its ``clean_mask``)."""

    def __init__(self, num_samples: int, num_classes: int, device: torch.device):
        self.targets = torch.full((num_samples, num_classes), 1.0 / num_classes, device=device)
        self.mask = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def take(self, data: TrainData, method: str) -> Tensor:
        """The shots' indices of ``data`` (recorded with their labels); a cell without any is refused."""
        shots = data.trusted.nonzero().flatten()
        if len(shots) == 0:
            raise ValueError(f"{method} trains on the revealed few shots, and this cell reveals none (grid.shots: 0)")
        self.mask.copy_(data.trusted)
        self.targets[shots] = data.cand[shots]
        return shots

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.clone(), "shots": self.mask.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets.copy_(state["targets"])
        self.mask.copy_(state["shots"])
