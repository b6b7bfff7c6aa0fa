"""Grid expansion: a validated :class:`~orchestrator.config.Grid` becomes cells, studies and
annotation jobs.

A *cell* is one point of the grid (dataset x annotator x q x eta x shots x fraction x seed). A
*study* is one Optuna search of one method on one cell; its trials differ only in the sampled
hyperparameters. Grid axes are never Optuna parameters. q and eta are axes of synthetic
annotators only: cells of other annotators carry ``None`` there (and cells of the ``uniform``
generator, which has no q, carry ``q = None``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from orchestrator import runs
from orchestrator.annotation.synthetic import USES_Q
from orchestrator.config import AnnotatorSpec, DatasetSpec, Grid, MethodSpec
from trainables.settings import TrainSettings
from trainables.data.spec import signature
from trainables.registry import ALGORITHMS
from trainables.spec import CellSpec, TrialSpec


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    annotator: AnnotatorSpec
    q: float | None
    eta: float | None
    shots: int
    unlabeled_fraction: float
    seed: int

    @classmethod
    def from_spec(cls, cell: CellSpec) -> "Cell":
        """The grid cell of a trial's :class:`CellSpec` (a rerun reads one back from MLflow)."""
        annotator = TypeAdapter(AnnotatorSpec).validate_python(dict(cell.annotator))
        return cls(cell.dataset, annotator, cell.q, cell.eta, cell.shots, cell.unlabeled_fraction, cell.seed)

    def spec(self) -> CellSpec:
        return CellSpec(
            self.dataset, self.annotator.model_dump(), self.q, self.eta, self.shots, self.unlabeled_fraction, self.seed
        )

    def as_config(self) -> dict[str, Any]:
        return self.spec().to_config()

    @property
    def annotation_job(self) -> tuple:
        """Cells that share this tuple share one annotation (CLIP ignores the seed)."""
        seed = self.seed if self.annotator.kind == "synthetic" else None
        return (self.dataset, self.annotator, self.q, self.eta, seed)

    def label(self, with_seed: bool = True) -> str:
        return runs.cell_label(self.spec(), with_seed=with_seed)


@dataclass(frozen=True)
class Study:
    study_id: str
    cell: Cell
    method: MethodSpec
    training: TrainSettings
    """Default + grid ``training:`` + the method's ``training:`` overrides."""
    params: dict[str, Any]
    """The method's dataclass defaults updated with the grid's fixed ``params:``."""
    experiment: str = ""
    """The grid's experiment (the start of ``study_id``; it may itself hold dots)."""

    @property
    def objective(self) -> str:
        return self.method.search.objective

    @property
    def readable_name(self) -> str:
        """Experiment, method and cell in words: the Optuna study's name (what optuna-dashboard lists)."""
        return f"{self.experiment} | {self.method.label or self.method.name} | {self.cell.label()}"

    @property
    def key(self) -> str:
        """The hash of the cell, method and training settings that ends ``study_id``."""
        return self.study_id.rsplit(".", 1)[-1]

    @property
    def mode(self) -> str:
        return self.method.search.mode

    def trial_config(
        self, sampled: dict[str, Any], *, annotation_key: str, cache_dir: str, cpus: float, **extra: Any
    ) -> TrialSpec:
        """The resolved spec of one trial: the study's params and training settings with the
        ``sampled`` values applied, plus where the annotation cache is. ``extra``: the other
        :class:`TrialSpec` fields (``optuna_trial``, ``mlflow_run_id``, ``device``...)."""
        params = {**self.params, **{k: v for k, v in sampled.items() if k in self.params}}
        training = dataclasses.replace(self.training, **{k: v for k, v in sampled.items() if k not in self.params})
        return TrialSpec(
            study=self.study_id,
            method=self.method.name,
            label=self.method.label or self.method.name,
            cell=self.cell.spec(),
            params=params,
            training=training,
            sampled=dict(sampled),
            objective=self.objective,
            mode=self.mode,
            annotation_key=annotation_key,
            cache_dir=cache_dir,
            cpus=cpus,
            **extra,
        )


class TrialSpecs:
    """The spec of each Tune trial, read once from its config (callbacks see a trial many times)."""

    def __init__(self) -> None:
        self._specs: dict[str, TrialSpec] = {}

    def __call__(self, trial: Any) -> TrialSpec:
        spec = self._specs.get(trial.trial_id)
        if spec is None:
            spec = self._specs[trial.trial_id] = TrialSpec.from_config(trial.config)
        return spec


def dataset_specs(grid: Grid) -> list[tuple[int, DatasetSpec]]:
    """Every data set of the grid with the index of its entry: each entry once, or once per value of
    the ``imbalance_ratio`` axis (1: the balanced pool)."""
    ratios = grid.grid.imbalance_ratio
    if ratios is None:
        return list(enumerate(grid.datasets))
    out = []
    for i, ds in enumerate(grid.datasets):
        for r in ratios:
            update: dict[str, Any] = {"imbalance_ratio": None if r == 1.0 else float(r)}
            if ds.label is not None and r != 1.0:  # a labelled entry's columns stay apart too
                update["label"] = f"{ds.label}-LT{r:g}"
            out.append((i, ds.model_copy(update=update)))
    return out


def expand_cells(grid: Grid) -> list[Cell]:
    axes = grid.grid
    cells = []
    datasets = [ds for _, ds in dataset_specs(grid)]
    for dataset, annotator in itertools.product(datasets, grid.annotators):
        synthetic = annotator.kind == "synthetic"
        qs = axes.q if synthetic and annotator.generator in USES_Q else [None]
        etas = axes.eta if synthetic else [None]
        for seed, q, eta, shots, fraction in itertools.product(
            axes.seeds, qs, etas, axes.shots, axes.unlabeled_fraction
        ):
            cells.append(Cell(dataset, annotator, q, eta, shots, fraction, seed))
    return cells


def method_training(grid: Grid, method: MethodSpec) -> TrainSettings:
    """A method's training settings: the defaults, then the grid's ``training:``, then the method's."""
    return method.training.apply(grid.training.apply(TrainSettings()))


def expand(grid: Grid) -> list[Study]:
    """Every (cell, method) study, ordered so that a round-robin over them keeps cells concurrent."""
    studies = []
    for cell in expand_cells(grid):
        for method in grid.methods:
            spec = ALGORITHMS[method.name]
            params = {**dataclasses.asdict(spec.params()), **method.params}
            training = method_training(grid, method)
            study_key = signature({"cell": cell.as_config(), "method": method.model_dump(exclude={"label"} if method.label is None else None), "training": training.signed()}, 10)
            study_id = f"{grid.experiment}.{method.label or method.name}.{study_key}"
            studies.append(Study(study_id, cell, method, training, params, grid.experiment))
    return studies
