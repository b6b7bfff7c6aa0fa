"""ALIM-Onehot: how lambda is set (adaptive or fixed), the fixed lambda, the eta-estimate scale, the lr.

Every trial is asked for all of them so the parameter names do not depend on the sampled mode:
``lam`` matters only when ``lambda_mode`` is ``fixed``, ``eta_scale`` only when it is ``adaptive``.
:func:`lambda_space` is also ALIM-Scale's (``alim_scale``).
"""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def lambda_space(s: Space) -> dict[str, Any]:
    """How ALIM's lambda is set: ``lambda_mode``, ``lam``, ``eta_scale``, asked in this order."""
    return {
        "lambda_mode": s.categorical("lambda_mode", ["adaptive", "fixed"]),
        "lam": s.float("lam", 0.0, 1.0),
        "eta_scale": s.float("eta_scale", 0.5, 2.0),
    }


def space(s: Space) -> dict[str, Any]:
    return {**lambda_space(s), "lr": s.float("lr", 1e-3, 0.2, log=True)}
