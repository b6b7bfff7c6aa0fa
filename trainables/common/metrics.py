"""Averaging of per-step training values into the per-epoch ``train/...`` metrics."""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor


class MeanMeter:
    """Accumulates named scalars (floats or 0-d tensors) and reports their means.

    Tensors are summed on their device and read once in :meth:`means`, so adding a GPU loss at
    every step does not synchronise with the GPU.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float | Tensor] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, **values: float | Tensor) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (value.detach().float() if isinstance(value, Tensor) else float(value))
            self.counts[name] += 1

    def update(self, other: "MeanMeter") -> None:
        for name, total in other.sums.items():
            self.sums[name] += total
            self.counts[name] += other.counts[name]

    def means(self, prefix: str = "train/") -> dict[str, float]:
        return {prefix + name: float(self.sums[name]) / self.counts[name] for name in self.sums}
