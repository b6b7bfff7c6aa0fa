"""The registry of algorithms, keyed by the name used everywhere.

Each algorithm's declaration (``trainables/params/<module>.py``) registers its ``SPECS`` tuple
(several variants in one file, e.g. ALIM-Onehot and ALIM-Scale) or its single ``SPEC``. Only the
declarations are imported here: torch and the algorithm come with the first ``spec.build``.
"""

from __future__ import annotations

from types import ModuleType

from trainables.params import alim, cc, coop, coreg, cr_dpll, dividemix, irnet, kd, lw, pico, pico_plus, proden, rc, vlm_lora
from trainables.settings import AlgorithmSpec

MODULES: tuple[ModuleType, ...] = (alim, cc, coreg, cr_dpll, irnet, lw, pico, pico_plus, proden, rc, dividemix, kd, coop, vlm_lora)


def module_specs(module: ModuleType) -> tuple[AlgorithmSpec, ...]:
    """The specs a module registers: its ``SPECS`` tuple, else its ``SPEC``."""
    specs = getattr(module, "SPECS", None)
    return tuple(specs) if specs is not None else (module.SPEC,)


def _collect(modules: tuple[ModuleType, ...]) -> dict[str, AlgorithmSpec]:
    algorithms: dict[str, AlgorithmSpec] = {}
    for module in modules:
        for spec in module_specs(module):
            if spec.name in algorithms:
                raise ValueError(f"algorithm {spec.name!r} is registered twice (again by {module.__name__})")
            algorithms[spec.name] = spec
    return algorithms


ALGORITHMS: dict[str, AlgorithmSpec] = _collect(MODULES)


def get(name: str) -> AlgorithmSpec:
    """The spec registered as ``name``; KeyError naming the allowed names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}") from None
