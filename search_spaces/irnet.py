"""IRNet: the detection margin, the correction start, the reverse-CE weight and the learning rate.

The CE weight stays 1: the learning rate already sets the overall scale of the loss.
"""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "margin": s.float("margin", 0.0, 0.5),
        "warmup_epochs": s.int("warmup_epochs", 1, 50),
        "rce_weight": s.float("rce_weight", 0.0, 1.0),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
