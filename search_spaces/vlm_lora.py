"""LoRA on the annotator's VLM: the adapters' learning rate, rank and where they sit (alpha stays
at its value, so a smaller rank takes larger steps: the scale is alpha / r)."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {
        "lora_lr": s.float("lora_lr", 1e-5, 1e-3, log=True),
        "rank": s.categorical("rank", [8, 16, 32, 64, 128]),
        "targets": s.categorical("targets", ["language_model", "attention"]),
    }
