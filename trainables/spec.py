"""The typed spec of one trial: everything that determines its result, plus where its inputs are.

``orchestrator/plan.py`` builds one :class:`TrialSpec` per trial; it travels through Ray Tune's
config and MLflow's ``resolved_config.json`` as plain JSON (:meth:`TrialSpec.to_config`) and comes
back with :meth:`TrialSpec.from_config`. The loop, reruns, tracking and the rerun page read its
fields. Its ``signature`` (a hash of method, cell, params, training settings and annotation key,
computed here and nowhere else) is the run's identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainables.settings import TrainSettings
from trainables.data.spec import DatasetSpec, signature

CHECKPOINT_FILE = "state.pt"
"""A trial checkpoint's file, in the directory Tune hands the loop (read by the driver on resume)."""

SIGNED = ("method", "cell", "params", "training", "annotation_key")
"""The config keys whose values determine a trial's result (its signature)."""


@dataclass(frozen=True)
class CellSpec:
    """One point of the grid: data set x annotator x q x eta x shots x unlabeled fraction x seed."""

    dataset: DatasetSpec
    annotator: Mapping[str, Any]
    """The annotator's resolved grid entry (``kind``, ``name`` and its options)."""
    q: float | None
    eta: float | None
    shots: int
    unlabeled_fraction: float
    seed: int

    @property
    def annotator_name(self) -> str:
        return str(self.annotator["name"])

    @property
    def annotator_kind(self) -> str:
        return str(self.annotator["kind"])

    def to_config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.model_dump(),
            "annotator": dict(self.annotator),
            "q": self.q,
            "eta": self.eta,
            "shots": self.shots,
            "unlabeled_fraction": self.unlabeled_fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> "CellSpec":
        return cls(**{**raw, "dataset": DatasetSpec(**raw["dataset"]), "annotator": dict(raw["annotator"])})


@dataclass(frozen=True)
class TrialSpec:
    """One trial, resolved: a method with its params and training settings on one cell."""

    study: str
    method: str
    label: str
    """The method's row label in the grid (``method`` unless the grid names a variant)."""
    cell: CellSpec
    params: Mapping[str, Any]
    """Every field of the method's params dataclass (defaults + grid overrides + sampled)."""
    training: TrainSettings
    sampled: Mapping[str, Any]
    """The values Optuna sampled for this trial (empty for the resolved first trial)."""
    objective: str
    mode: str
    annotation_key: str
    cache_dir: str
    cpus: float = 1.0
    device: str | None = None
    """``cpu`` / ``cuda``; None: CUDA when available."""
    resume_checkpoint: str | None = None
    """The last checkpoint of an interrupted sweep's trial, to resume from."""
    variant: str | None = None
    """An ablation or override label of a rerun (``no_prototypes``, ``lr=0.01``); None for a sweep's trial."""
    rerun_of: str | None = None
    """The MLflow run this one reruns (reruns only)."""
    mlflow_run_id: str | None = None
    """The trial's MLflow run, when the driver created it before the trial started (a resumed sweep)."""
    optuna_trial: int | None = None
    """The trial's number in its Optuna study."""
    signature: str = field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", signature({k: self._signed(k) for k in SIGNED}))

    def _signed(self, key: str) -> Any:
        value = getattr(self, key)
        if key == "cell":
            return value.to_config()
        if key == "training":
            return value.signed()
        return dict(value) if isinstance(value, Mapping) else value

    @property
    def seed(self) -> int:
        return self.cell.seed

    def replace(self, **changes: Any) -> "TrialSpec":
        """A copy with ``changes`` applied (the signature is recomputed)."""
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """Plain JSON: Tune's trial config and MLflow's ``resolved_config.json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(cell=self.cell.to_config(), training=dataclasses.asdict(self.training))
        out.update(params=dict(self.params), sampled=dict(self.sampled))
        return out

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> "TrialSpec":
        """Read back :meth:`to_config` (unknown keys are refused, the signature is recomputed),
        also a config written before ``label`` and ``sampled`` existed."""
        raw = {"label": raw.get("method"), "sampled": {}, **raw}
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(raw) - names - {"signature"}
        if unknown:
            raise ValueError(f"unknown trial config keys: {', '.join(sorted(unknown))}")
        values = {k: v for k, v in raw.items() if k in names}
        values["cell"] = CellSpec.from_config(raw["cell"])
        values["training"] = TrainSettings(**raw["training"])
        return cls(**values)
