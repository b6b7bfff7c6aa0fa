"""DivideMix: the values the paper tunes per noise level (lambda_u, the clean threshold), T and the learning rate."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "lambda_u": s.categorical("lambda_u", [0.0, 25.0, 50.0, 150.0]),  # paper appendix, by noise level
        "p_threshold": s.float("p_threshold", 0.3, 0.9),
        "T": s.float("T", 0.25, 1.0),
        "lr": s.float("lr", 1e-3, 0.1, log=True),
    }
