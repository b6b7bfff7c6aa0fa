"""The registry of algorithms: one entry per module, keyed by the name used everywhere."""

from __future__ import annotations

from trainables import cc, coreg, lwc, lws, proden, rc
from trainables.api import AlgorithmSpec

ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec for spec in (cc.SPEC, coreg.SPEC, lwc.SPEC, lws.SPEC, proden.SPEC, rc.SPEC)
}


def get(name: str) -> AlgorithmSpec:
    """The spec registered as ``name``; KeyError naming the allowed names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}") from None
