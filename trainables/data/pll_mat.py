"""Partial-label ``.mat`` files in the standard layout (Zhang's PLL data page, PLENCH, DNPL, ...).

One reader for the named real-world sets (``lost``, ``msrcv2``) and for any file a grid names with
``{name: pll_mat, path: ...}`` (BirdSong, Soccer Player, Yahoo! News, Italian, ...: no code needed).

Keys of the file (MATLAB v5, as ``scipy.io.loadmat`` reads it; dense or sparse matrices):

- ``features``: (N, D) numbers;
- ``p_labels``: (N, C) candidate sets (non-zero = candidate), the annotators' ambiguity;
- ``logitlabels``: (N, C) one-hot ground truth (metrics only);
- optional ``tr`` / ``te``: cells (1 x K) of 1-based train / test index vectors, the predefined
  splits (``DatasetSpec.split`` picks one, default 0). Without them a seeded, class-stratified
  80/20 split is drawn (seed ``subsample_seed``);
- optional ``class_names``: a cell (or char matrix) of C names; else ``class 0`` ...

Some redistributions store ``p_labels`` and ``logitlabels`` as (C, N); a matrix whose second axis
does not match N but whose first does is read transposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PLL_KEYS = ("features", "p_labels", "logitlabels")
"""The keys every partial-label ``.mat`` file must hold."""
TEST_FRACTION = 0.2
"""Share of the samples held out as the test part of a file without predefined splits."""
LAYOUT = (
    "a MATLAB v5 .mat file with `features` (N x D), `p_labels` (N x C candidate sets), `logitlabels` "
    "(N x C one-hot truth), optionally `tr` / `te` (1 x K cells of 1-based index vectors) and `class_names`"
)


@dataclass
class PllArrays:
    """One train/test split of a partial-label file. ``*_y`` are ground truth (metrics only)."""

    train_x: np.ndarray  # (N, D) float32
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray  # (M, D) float32
    test_y: np.ndarray  # (M,) int64
    train_cand: np.ndarray  # (N, C) bool
    class_names: tuple[str, ...]
    split: dict[str, Any]
    """How the split was made (predefined index or the seeded fraction), for the identity."""


def _dense(a: Any) -> np.ndarray:
    return np.asarray(a.toarray() if hasattr(a, "toarray") else a)


def _per_sample(name: str, path: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """``a`` as (N, C): transposed when it is stored class-major."""
    if a.ndim != 2:
        raise ValueError(f"{name}: {path}: {key} is {a.shape}, expected a 2-D (N, C) matrix")
    if a.shape[0] != n and a.shape[1] == n:
        a = a.T
    if a.shape[0] != n:
        raise ValueError(f"{name}: {path}: {key} is {a.shape} but features has {n} rows")
    return a


def _class_names(name: str, path: Path, raw: Any, num_classes: int) -> tuple[str, ...]:
    if raw is None:
        return tuple(f"class {i}" for i in range(num_classes))
    arr = np.asarray(raw)
    if arr.dtype.kind in "US":  # a char matrix: one name per row
        names = [str(row).strip() for row in (arr if arr.ndim == 1 else ["".join(r) for r in arr])]
    else:  # a cell: objects holding 1-element string arrays
        names = [str(np.asarray(c).ravel()[0]).strip() if np.asarray(c).size else "" for c in arr.ravel()]
    if len(names) != num_classes or not all(names):
        raise ValueError(f"{name}: {path}: class_names holds {len(names)} names for {num_classes} classes")
    return tuple(names)


def _seeded_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from trainables.data.datasets import stratified_subset

    test = np.zeros(len(y), dtype=bool)
    test[stratified_subset(y, max(1, round(TEST_FRACTION * len(y))), np.random.default_rng([seed, 0]))] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def _predefined_split(name: str, path: Path, mat: dict, split: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, test) 0-based indices of predefined split ``split`` and the number of splits."""
    tr, te = np.asarray(mat["tr"]).ravel(), np.asarray(mat["te"]).ravel()
    if tr.dtype != object:  # a single split stored as one index vector, not a cell
        tr, te = np.array([tr], dtype=object), np.array([te], dtype=object)
    if not split < min(len(tr), len(te)):
        raise ValueError(f"{name}: split {split} asked but {path} has {min(len(tr), len(te))} splits")
    train = np.asarray(tr[split], dtype=np.int64).ravel() - 1  # MATLAB indices are 1-based
    test = np.asarray(te[split], dtype=np.int64).ravel() - 1
    if train.min() < 0 or test.min() < 0 or train.max() >= n or test.max() >= n or np.intersect1d(train, test).size:
        raise ValueError(f"{name}: {path}: split {split} has indices outside 1..{n} or shared by train and test")
    return train, test, int(min(len(tr), len(te)))


def read_pll_mat(name: str, path: Path, split: int | None, seed: int) -> PllArrays:
    """Split ``split`` (predefined; None: 0 when the file has splits, else the seeded 80/20 split
    of ``seed``) of the partial-label file ``path``. ``name`` prefixes every error."""
    from scipy.io import loadmat

    from trainables.data.datasets import DatasetNotFoundError

    try:
        mat = loadmat(str(path))
    except Exception as err:  # truncated file, HDF5 (v7.3) instead of v5, not a .mat at all
        raise DatasetNotFoundError(f"{name}: {path} is not a readable MATLAB v5 file ({type(err).__name__}: {err}); expected {LAYOUT}") from err
    has = sorted(k for k in mat if not k.startswith("__"))
    missing = [k for k in PLL_KEYS if k not in mat]
    if missing:
        raise ValueError(f"{name}: {path} lacks the key(s) {missing}; has {has}; expected {LAYOUT}")
    if ("tr" in mat) != ("te" in mat):
        raise ValueError(f"{name}: {path} has only one of `tr` / `te`; predefined splits need both")
    x = _dense(mat["features"]).astype(np.float64)  # (N, D)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"{name}: {path}: features must be a finite 2-D (N, D) matrix, got {x.shape}")
    n = x.shape[0]
    cand = _per_sample(name, path, "p_labels", _dense(mat["p_labels"]), n) > 0  # (N, C)
    onehot = _per_sample(name, path, "logitlabels", _dense(mat["logitlabels"]), n)  # (N, C)
    if cand.shape != onehot.shape:
        raise ValueError(f"{name}: {path}: p_labels {cand.shape} and logitlabels {onehot.shape} disagree")
    if not np.all(onehot.sum(axis=1) == 1):
        raise ValueError(f"{name}: {path}: logitlabels is not one-hot")
    if not cand.any(axis=1).all():
        raise ValueError(f"{name}: {path}: {int((~cand.any(axis=1)).sum())} samples have an empty candidate set")
    y = onehot.argmax(axis=1).astype(np.int64)
    names = _class_names(name, path, mat.get("class_names"), cand.shape[1])
    if "tr" in mat:
        k = 0 if split is None else split
        train, test, count = _predefined_split(name, path, mat, k, n)
        how: dict[str, Any] = {"predefined": k, "of": count}
    elif split is not None:
        raise ValueError(f"{name}: split {split} asked but {path} has no predefined splits (no `tr` / `te`)")
    else:
        train, test = _seeded_split(y, seed)
        how = {"test_fraction": TEST_FRACTION, "seed": seed, "stratified": True}
    return PllArrays(
        x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test], cand[train], names, how
    )
