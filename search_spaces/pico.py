"""PiCO: the contrastive loss weight and the prototype momentum gamma (its sensitivity study), and the lr."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "cont_weight": s.float("cont_weight", 0.05, 2.0, log=True),
        "proto_momentum": s.float("proto_momentum", 0.9, 0.999),
        "lr": s.float("lr", 1e-3, 0.2, log=True),
    }
