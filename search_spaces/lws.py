"""LWS: the learning rate and beta, the weight of the non-candidate term (default 1, inside the range)."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {"lr": s.float("lr", 1e-3, 0.2, log=True), "beta": s.float("beta", 0.1, 10.0, log=True)}
