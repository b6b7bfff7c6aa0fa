"""PiCO+: reliable fraction, kNN size, weight of the unreliable terms, contrastive weight, learning rate."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "pure_ratio": s.float("pure_ratio", 0.3, 0.9),
        "num_neighbors": s.int("num_neighbors", 4, 32, log=True),
        "ur_weight": s.float("ur_weight", 0.01, 1.0, log=True),
        "cont_weight": s.float("cont_weight", 0.05, 2.0, log=True),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
