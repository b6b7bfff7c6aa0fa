"""The typed data-set entry of a grid (``datasets[]``) that :func:`~trainables.data.datasets.load_dataset` reads.

It lives on the learning side because the loaders read it; the orchestrator's grid schema embeds it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainables.data.datasets import DATASETS


class Strict(BaseModel):
    """A frozen pydantic model that refuses unknown keys (every grid section derives from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """`` (did you mean 'tau_div'?)`` for a misspelt ``name`` close to one of ``allowed``, else ``""``."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def signature(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (a run's identity)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class DatasetSpec(Strict):
    name: str
    root: str | None = None
    """Directory holding the data set files (torchvision layout, Debian's fashion-mnist dir, or the
    directory of lost.mat / MSRCv2.mat)."""
    download: bool = False
    """Let torchvision download the files (users' machines only; never in tests)."""
    subsample: int | None = Field(default=None, gt=0)
    """Keep a seeded, class-stratified subset of this many training images."""
    test_subsample: int | None = Field(default=None, gt=0)
    """Keep a seeded, class-stratified subset of this many test images."""
    subsample_seed: int = 0
    """Seed of the subsets (and of the train/test split for data sets that have none)."""
    split: int | None = Field(default=None, ge=0)
    """Predefined train/test split (0-based) of data sets that ship them (lost, msrcv2: 0..4; default 0)."""
    feature_scaling: Literal["per_feature", "global"] | None = None
    """Feature data sets only (default ``per_feature``): z-score every dimension with the training
    part's mean and std, or (``global``) subtract the training mean and divide every dimension by
    one training scale, which keeps the relative scales of the features (Lost's carry information)."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        info = DATASETS.get(data.get("name")) if isinstance(data, dict) else None
        if info is not None and info.splits and data.get("split") is None:
            data = {**data, "split": 0}
        if info is not None and info.kind == "features" and data.get("feature_scaling") is None:
            data = {**data, "feature_scaling": "per_feature"}
        return data

    @model_validator(mode="after")
    def _fits_dataset(self) -> "DatasetSpec":
        if self.feature_scaling is not None and DATASETS[self.name].kind != "features":
            raise ValueError(f"feature_scaling: {self.name} has images, not features (images are normalised per channel)")
        splits = DATASETS[self.name].splits
        if self.split is not None and splits == 0:
            with_splits = ", ".join(n for n, info in DATASETS.items() if info.splits)
            raise ValueError(f"split: {self.name} has no predefined train/test splits (data sets that have: {with_splits})")
        if self.split is not None and self.split >= splits:
            raise ValueError(f"split: {self.name} has {splits} predefined splits (0..{splits - 1}), got {self.split}")
        return self

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str | None) -> str | None:
        # Tune runs each trial in its own working directory: a relative root would move.
        return None if root is None else str(Path(root).expanduser().resolve())

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; allowed: {', '.join(sorted(DATASETS))}")
        return name
