"""KD: the distillation temperature and the learning rate."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "temperature": s.float("temperature", 0.5, 8.0, log=True),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
