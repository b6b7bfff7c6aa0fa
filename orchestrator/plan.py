"""Grid expansion: a validated :class:`~orchestrator.config.Grid` becomes cells, studies and
annotation jobs.

A *cell* is one point of the grid (dataset x annotator x q x eta x shots x fraction x seed). A
*study* is one Optuna search of one method on one cell; its trials differ only in the sampled
hyperparameters. Grid axes are never Optuna parameters. q and eta are axes of synthetic
annotators only: cells of other annotators carry ``None`` there.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from orchestrator.config import AnnotatorSpec, DatasetSpec, Grid, MethodSpec, signature
from trainables.api import TrainSettings
from trainables.registry import ALGORITHMS


@dataclass(frozen=True)
class Cell:
    dataset: DatasetSpec
    annotator: AnnotatorSpec
    q: float | None
    eta: float | None
    shots: int
    unlabeled_fraction: float
    seed: int

    def as_config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.model_dump(),
            "annotator": self.annotator.model_dump(),
            "q": self.q,
            "eta": self.eta,
            "shots": self.shots,
            "unlabeled_fraction": self.unlabeled_fraction,
            "seed": self.seed,
        }

    @property
    def annotation_job(self) -> tuple:
        """Cells that share this tuple share one annotation (CLIP ignores the seed)."""
        seed = self.seed if self.annotator.kind == "synthetic" else None
        return (self.dataset, self.annotator, self.q, self.eta, seed)

    def label(self, with_seed: bool = True) -> str:
        parts = [self.dataset.name, self.annotator.name]
        if self.q is not None:
            parts.append(f"q={self.q:g}")
        if self.eta is not None:
            parts.append(f"eta={self.eta:g}")
        if self.shots:
            parts.append(f"shots={self.shots}")
        if self.unlabeled_fraction != 1.0:
            parts.append(f"frac={self.unlabeled_fraction:g}")
        if with_seed:
            # A predefined split is a repetition like a seed: shown with it, pooled without it.
            if self.dataset.split is not None:
                parts.append(f"split={self.dataset.split}")
            parts.append(f"seed={self.seed}")
        return " ".join(parts)

    def tags(self) -> dict[str, str]:
        return {
            "dataset": self.dataset.name,
            "annotator": self.annotator.name,
            "q": "" if self.q is None else f"{self.q:g}",
            "eta": "" if self.eta is None else f"{self.eta:g}",
            "shots": str(self.shots),
            "fraction": f"{self.unlabeled_fraction:g}",
            "seed": str(self.seed),
        }


@dataclass(frozen=True)
class Study:
    study_id: str
    cell: Cell
    method: MethodSpec
    training: TrainSettings
    """Default + grid ``training:`` + the method's ``training:`` overrides."""
    params: dict[str, Any]
    """The method's dataclass defaults updated with the grid's fixed ``params:``."""

    @property
    def objective(self) -> str:
        return self.method.search.objective

    @property
    def mode(self) -> str:
        return self.method.search.mode

    def trial_config(self, sampled: dict[str, Any], *, annotation_key: str, cache_dir: str, cpus: float) -> dict[str, Any]:
        """The resolved config of one trial: everything that determines its result, plus where the
        annotation cache is. ``signature`` hashes the parts that determine the result."""
        param_names = set(self.params)
        params = {**self.params, **{k: v for k, v in sampled.items() if k in param_names}}
        training = {**dataclasses.asdict(self.training), **{k: v for k, v in sampled.items() if k not in param_names}}
        config = {
            "study": self.study_id,
            "method": self.method.name,
            "label": self.method.label or self.method.name,
            "cell": self.cell.as_config(),
            "params": params,
            "training": training,
            "sampled": dict(sampled),
            "objective": self.objective,
            "mode": self.mode,
            "annotation_key": annotation_key,
            "cache_dir": cache_dir,
            "cpus": cpus,
        }
        config["signature"] = signature(
            {k: config[k] for k in ("method", "cell", "params", "training", "annotation_key")}
        )
        return config


def expand_cells(grid: Grid) -> list[Cell]:
    axes = grid.grid
    cells = []
    for dataset, annotator in itertools.product(grid.datasets, grid.annotators):
        synthetic = annotator.kind == "synthetic"
        qs = axes.q if synthetic else [None]
        etas = axes.eta if synthetic else [None]
        for seed, q, eta, shots, fraction in itertools.product(
            axes.seeds, qs, etas, axes.shots, axes.unlabeled_fraction
        ):
            cells.append(Cell(dataset, annotator, q, eta, shots, fraction, seed))
    return cells


def expand(grid: Grid) -> list[Study]:
    """Every (cell, method) study, ordered so that a round-robin over them keeps cells concurrent."""
    base = grid.training.apply(TrainSettings())
    studies = []
    for cell in expand_cells(grid):
        for method in grid.methods:
            spec = ALGORITHMS[method.name]
            params = {**dataclasses.asdict(spec.params()), **method.params}
            training = method.training.apply(base)
            study_key = signature({"cell": cell.as_config(), "method": method.model_dump(exclude={"label"} if method.label is None else None), "training": dataclasses.asdict(training)}, 10)
            study_id = f"{grid.experiment}.{method.label or method.name}.{study_key}"
            studies.append(Study(study_id, cell, method, training, params))
    return studies
