"""A classifier around an encoder, with an optional projection head for contrastive / prototype losses."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Net(nn.Module):
    """encoder -> linear classifier, and encoder -> 2-layer MLP projector -> L2-normalised embedding.

    ``proj_dim=None`` builds no projector (methods without representation losses).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, proj_dim: int | None = 128):
        super().__init__()
        width = encoder.out_dim
        self.encoder = encoder
        self.classifier = nn.Linear(width, num_classes)
        head_init = getattr(encoder, "head_init", None)  # a CLIP encoder's text classifier (PartialCLIP)
        if head_init is not None:
            with torch.no_grad():
                self.classifier.weight.copy_(head_init[0])
                self.classifier.bias.copy_(head_init[1])
        self.projector = None
        if proj_dim is not None:
            self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x))  # (B, C)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, C), z (B, proj_dim) with ||z|| = 1) from one pass through the encoder."""
        if self.projector is None:
            raise RuntimeError("this Net was built without a projector (proj_dim=None)")
        h = self.encoder(x)
        return self.classifier(h), F.normalize(self.projector(h), dim=1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded, restoring the caller's RNG state afterwards.

    Algorithms build their networks inside it, so initial weights depend on ``ctx.seed`` only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
