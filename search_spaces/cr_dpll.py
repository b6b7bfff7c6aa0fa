"""CR-DPLL: the consistency weight lambda, the ramp length T' (fraction of training) and the learning rate."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "lam": s.float("lam", 0.1, 10.0, log=True),
        "rampup_fraction": s.float("rampup_fraction", 0.0, 1.0),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
