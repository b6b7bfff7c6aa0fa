"""CoOp: the learning rate and the context (length, shared or per class), as the paper's ablations vary."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "lr": s.float("lr", 1e-4, 0.1, log=True),
        "n_ctx": s.categorical("n_ctx", [4, 8, 16]),
        "class_specific": s.categorical("class_specific", [False, True]),
    }
