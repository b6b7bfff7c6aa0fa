"""Co-Reg: the paper's searched hyperparameters (tau_div, beta1, beta2, T), lambda_u, and the learning rate."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "tau_div": s.float("tau_div", 0.3, 0.9),
        "beta1": s.float("beta1", 0.01, 1.0, log=True),
        "beta2": s.float("beta2", 0.01, 1.0, log=True),
        "T": s.float("T", 0.25, 1.0),
        "lambda_u": s.float("lambda_u", 0.1, 25.0, log=True),
        "lr": s.float("lr", 1e-3, 0.1, log=True),
    }
