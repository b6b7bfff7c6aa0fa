"""Define-by-run Optuna search spaces, one module per registered algorithm (same name).

Each module defines ``space(s: Space) -> dict`` that asks ``s`` for its parameters and returns the
sampled values, keyed by the method's hyperparameter names (or by ``TrainSettings`` names such as
``lr``). grid.yaml can fix a parameter (``space: {tau_div: 0.5}``) or narrow / replace its range
(``space: {lr: {low: 0.01, high: 0.1, log: true}}``, ``space: {T: {choices: [0.5, 1.0]}}``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import optuna


class Space:
    """Wraps an Optuna trial and applies the grid's overrides to each parameter it is asked for."""

    def __init__(self, trial: optuna.Trial, overrides: Mapping[str, Any] | None = None):
        self.trial = trial
        self.overrides = dict(overrides or {})
        self.asked: list[str] = []

    def _override(self, name: str) -> tuple[bool, Any]:
        self.asked.append(name)
        if name not in self.overrides:
            return False, None
        value = self.overrides[name]
        if isinstance(value, Mapping):
            return False, value
        return True, value

    def _number(self, suggest: Callable[..., Any], cast: type, name: str, low: Any, high: Any, log: bool) -> Any:
        fixed, value = self._override(name)
        if fixed:
            return cast(value)
        if value is not None:
            if "choices" in value:
                return self.trial.suggest_categorical(name, list(value["choices"]))
            low, high, log = value.get("low", low), value.get("high", high), value.get("log", log)
        return suggest(name, low, high, log=log)

    def float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return self._number(self.trial.suggest_float, float, name, low, high, log)

    def int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        return self._number(self.trial.suggest_int, int, name, low, high, log)

    def categorical(self, name: str, choices: list[Any]) -> Any:
        fixed, value = self._override(name)
        if fixed:
            return value
        if value is not None:
            choices = list(value.get("choices", choices))
        return self.trial.suggest_categorical(name, choices)


PEFT_SPACES: dict[str, tuple[str, int, int]] = {
    "lora": ("lora_rank", 2, 64),
    "adapter": ("adapter_dim", 8, 256),
    "vpt": ("vpt_tokens", 1, 100),
}
"""The size of each tuned module searched beside any method's own space on the ``clip_peft``
backbone: LoRA's rank, the adapter's bottleneck, VPT's prompt length (log-uniform integers; VPT's
own search took 1 to 200 tokens)."""


def get_space(method: str, training: Any = None) -> Callable[[Space], dict[str, Any]]:
    """The ``space`` function of ``search_spaces/<method>.py``; on the ``clip_peft`` backbone
    (``training``: the study's ``TrainSettings``) it also asks for the size of each PEFT module."""
    try:
        module = importlib.import_module(f"search_spaces.{method}")
    except ModuleNotFoundError as err:
        raise KeyError(f"no search space for method {method!r} (expected search_spaces/{method}.py)") from err
    on_clip = getattr(training, "backbone", None) == "clip_peft"
    sizes = [PEFT_SPACES[m] for m in (training.peft_modules if on_clip else ()) if m in PEFT_SPACES]
    if not sizes:
        return module.space

    def with_peft(s: Space) -> dict[str, Any]:
        return {**module.space(s), **{name: s.int(name, low, high, log=True) for name, low, high in sizes}}

    return with_peft


def _asked(method: str, overrides: Mapping[str, Any] | None, training: Any) -> Space:
    """The method's space asked once, on a throwaway in-memory study."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per method
    try:
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    finally:
        optuna.logging.set_verbosity(verbosity)
    space = Space(study.ask(), overrides)
    get_space(method, training)(space)
    return space


def parameter_names(method: str, overrides: Mapping[str, Any] | None = None, training: Any = None) -> list[str]:
    """Names the method's space asks for (used to validate grid.yaml overrides before Ray starts)."""
    return _asked(method, overrides, training).asked


def parameter_choices(method: str, overrides: Mapping[str, Any] | None = None, training: Any = None) -> dict[str, list[Any]]:
    """The choices of every categorical parameter the method's space draws (``overrides`` applied):
    a study's first trial evaluates the grid's own values, which must be among them."""
    distributions = _asked(method, overrides, training).trial.distributions
    return {n: list(d.choices) for n, d in distributions.items() if isinstance(d, optuna.distributions.CategoricalDistribution)}
