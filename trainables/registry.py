"""The registry of algorithms: one entry per module, keyed by the name used everywhere."""

from __future__ import annotations

from trainables import alim_onehot, alim_scale, cc, coreg, cr_dpll, irnet, lwc, lws, pico, pico_plus, proden, rc
from trainables import dividemix, kd
from trainables.api import AlgorithmSpec

ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        alim_onehot.SPEC, alim_scale.SPEC, cc.SPEC, coreg.SPEC, cr_dpll.SPEC, irnet.SPEC, lwc.SPEC, lws.SPEC,
        pico.SPEC, pico_plus.SPEC, proden.SPEC, rc.SPEC,
        dividemix.SPEC, kd.SPEC,
    )
}


def get(name: str) -> AlgorithmSpec:
    """The spec registered as ``name``; KeyError naming the allowed names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}") from None
