"""ALIM-Scale: ALIM-Onehot's lambda parameters (``alim_onehot.lambda_space``: lambda mode, fixed
lambda, eta scale), then the scaling factor K, then the learning rate, asked in this order."""

from __future__ import annotations

from typing import Any

from search_spaces import Space
from search_spaces.alim_onehot import lambda_space


def space(s: Space) -> dict[str, Any]:
    return {
        **lambda_space(s),
        "scale_k": s.float("scale_k", 0.25, 4.0, log=True),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
