"""RC has no method hyperparameter besides the optimiser's: only the learning rate is searched."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {"lr": s.float("lr", 1e-3, 0.2, log=True)}
