"""Zero-shot trains nothing: there is nothing to search (an empty space; one trial per cell is enough)."""

from __future__ import annotations

from typing import Any

from search_spaces import Space


def space(s: Space) -> dict[str, Any]:
    return {}
