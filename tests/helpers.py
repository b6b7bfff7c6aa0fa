"""Tiny-data builders shared by the algorithm tests: 8x8 one-channel images, random candidate sets,
and the build context of a small CNN on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.api import BuildContext, TrainData, TrainSettings
from trainables.common.augment import make_views
from trainables.common.backbones import make_encoder


def tiny_images(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) random uint8 images."""
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)


def random_candidates(y: torch.Tensor, num_classes: int, q: float, g: torch.Generator) -> torch.Tensor:
    """(n, C) candidate sets: each class with probability ``q``, the true label ``y`` always."""
    cand = (torch.rand(len(y), num_classes, generator=g) < q).float()
    cand[torch.arange(len(y)), y] = 1.0
    return cand


def tiny_data(
    x: torch.Tensor, cand: torch.Tensor, trusted: torch.Tensor, *, hflip: bool = True, seed: int = 0,
    soft: torch.Tensor | None = None,
) -> TrainData:  # fmt: skip
    """``TrainData`` on ``x``: image views seeded ``seed + 1``, the shuffling generator ``seed + 2``."""
    views = make_views("image", mean=(0.5,), std=(0.25,), hflip=hflip, generator=torch.Generator().manual_seed(seed + 1))
    return TrainData(
        x=x, cand=cand, trusted=trusted, views=views, generator=torch.Generator().manual_seed(seed + 2), soft=soft
    )


def tiny_pll_data(
    n: int, num_classes: int, *, q: float, trusted: int = 0, hflip: bool = True, seed: int = 0
) -> tuple[TrainData, torch.Tensor]:
    """(data, y): random images and candidate sets (data seed 0); the first ``trusted`` samples carry
    the singleton of their true label and are flagged trusted."""
    g = torch.Generator().manual_seed(0)
    x = tiny_images(n, g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    cand = random_candidates(y, num_classes, q, g)
    cand[:trusted] = F.one_hot(y[:trusted], num_classes).float()
    return tiny_data(x, cand, torch.arange(n) < trusted, hflip=hflip, seed=seed), y


def tiny_ctx(
    num_samples: int, num_classes: int, *, epochs: int, batch_size: int, lr: float = 0.05, seed: int = 0
) -> BuildContext:
    """A small CNN on 8x8 one-channel images, on the CPU."""
    return BuildContext(
        num_classes=num_classes,
        num_samples=num_samples,
        make_encoder=lambda: make_encoder("small_cnn", in_channels=1, image_size=8),
        train=TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr),
        device=torch.device("cpu"),
        seed=seed,
    )
