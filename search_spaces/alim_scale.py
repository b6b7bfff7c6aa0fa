"""ALIM-Scale: as ALIM-Onehot (lambda mode, fixed lambda, eta scale, learning rate) plus the scaling factor K.

Every trial is asked for all of them so the parameter names do not depend on the sampled mode:
``lam`` matters only when ``lambda_mode`` is ``fixed``, ``eta_scale`` only when it is ``adaptive``.
"""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "lambda_mode": s.categorical("lambda_mode", ["adaptive", "fixed"]),
        "lam": s.float("lam", 0.0, 1.0),
        "eta_scale": s.float("eta_scale", 0.5, 2.0),
        "scale_k": s.float("scale_k", 0.25, 4.0, log=True),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
