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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from trainables.data.datasets import DATASETS, FROM_PATH


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


OPTIONS_SINCE_V2 = ("label", "path", "test_path", "class_names", "image_size", "channels", "imbalance_ratio")
"""Options added after the first grid format: left out of a dump when unset, so that the cell and
study signatures of a grid that does not use them stay what they were (resumable sweeps)."""


class DatasetSpec(Strict):
    name: str
    label: str | None = Field(default=None, min_length=1)
    """Column name in the tables and tag ``dataset`` (default: the name, or the file / folder name
    of a ``pll_mat`` / ``image_folder`` entry). Lets a grid hold one data set twice with different
    options (two scalings, two subsample sizes) as two columns."""
    root: str | None = None
    """Directory holding the data set files (torchvision layout, Debian's fashion-mnist dir, or the
    directory of lost.mat / MSRCv2.mat)."""
    path: str | None = None
    """``pll_mat``: the ``.mat`` file; ``image_folder``: the folder of training images (one
    subfolder per class, or a flat folder of unlabeled images). Required by those two, refused by
    the others."""
    test_path: str | None = None
    """``image_folder`` only: a labeled test folder (one subfolder per class, the same class names)."""
    class_names: tuple[str, ...] | str | None = None
    """``pll_mat`` / ``image_folder`` only: the class descriptions, as a list or as the path of a
    UTF-8 text file with one per line (required by a flat image folder; default: the class
    subfolders' names, the ``.mat`` file's ``class_names``, else ``class 0`` ...)."""
    image_size: int | None = Field(default=None, ge=8, le=512)
    """``image_folder`` only: images are resized to this square size (default 32)."""
    channels: Literal[1, 3] | None = None
    """``image_folder`` only: 3 (RGB, default) or 1 (grayscale)."""
    imbalance_ratio: float | None = Field(default=None, ge=1.0)
    """Long-tailed training pool (CIFAR-10-LT as in PartialCLIP, after Cao et al. 2019): class c
    (0-based) keeps ``floor(n_max * ratio^(-c / (C - 1)))`` of its training samples (seeded by
    ``subsample_seed``), so the largest class is ``ratio`` times the smallest. The test set is kept."""
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
        if info is not None and info.splits > 0 and data.get("split") is None:
            data = {**data, "split": 0}
        if info is not None and info.kind == "features" and data.get("feature_scaling") is None:
            data = {**data, "feature_scaling": "per_feature"}
        return data

    @model_validator(mode="after")
    def _fits_dataset(self) -> "DatasetSpec":
        info = DATASETS[self.name]
        if self.feature_scaling is not None and info.kind != "features":
            raise ValueError(f"feature_scaling: {self.name} has images, not features (images are normalised per channel)")
        splits = info.splits
        if self.split is not None and splits == 0:
            with_splits = ", ".join(n for n, i in DATASETS.items() if i.splits)
            raise ValueError(f"split: {self.name} has no predefined train/test splits (data sets that have: {with_splits})")
        if self.split is not None and 0 < splits <= self.split:
            raise ValueError(f"split: {self.name} has {splits} predefined splits (0..{splits - 1}), got {self.split}")
        self._check_path_options()
        return self

    def _check_path_options(self) -> None:
        """``path`` and the options of the data sets read from a user's files (pll_mat, image_folder)."""
        if self.name in FROM_PATH and self.path is None:
            what = "a partial-label .mat file" if self.name == "pll_mat" else "a folder of images"
            raise ValueError(f"path: required by {self.name} ({what})")
        allowed = {"path": FROM_PATH, "class_names": FROM_PATH, "test_path": ("image_folder",)}
        allowed.update({"image_size": ("image_folder",), "channels": ("image_folder",)})
        for key, names in allowed.items():
            if getattr(self, key) is not None and self.name not in names:
                raise ValueError(f"{key}: applies only to {' and '.join(names)}, not to {self.name}")
        if isinstance(self.class_names, tuple) and (not self.class_names or len(set(self.class_names)) < len(self.class_names)):
            raise ValueError(f"class_names: a non-empty list of distinct names, got {list(self.class_names)}")

    @property
    def display(self) -> str:
        """The entry's column name: its ``label``, else the file or folder name of a data set read
        from a path (``birdsong`` for ``path: .../birdsong.mat``), else the name; ``-LT<ratio>``
        appended for a long-tailed pool (``cifar10-LT100``)."""
        if self.label is not None:
            return self.label
        name = Path(self.path).stem if self.path is not None else self.name
        return name if self.imbalance_ratio is None else f"{name}-LT{self.imbalance_ratio:g}"

    @model_serializer(mode="wrap")
    def _omit_unset_options(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k in OPTIONS_SINCE_V2 and v is None)}

    @field_validator("class_names", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        """YAML and JSON give lists; the grid is validated strictly, which takes only tuples."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("root", "path", "test_path")
    @classmethod
    def _absolute(cls, root: str | None) -> str | None:
        # Tune runs each trial in its own working directory: a relative path would move.
        return None if root is None else str(Path(root).expanduser().resolve())

    @field_validator("class_names")
    @classmethod
    def _names_file_absolute(cls, names: tuple[str, ...] | str | None) -> tuple[str, ...] | str | None:
        return str(Path(names).expanduser().resolve()) if isinstance(names, str) else names

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; allowed: {', '.join(sorted(DATASETS))}")
        return name
