"""The stored annotation record: what an annotator said about a data set, as a trial reads it.

The orchestrator's annotation stage (``orchestrator/annotation/stage.py``) produces entries; a trial
reads one back with :func:`load_cached` by its key. This module owns the format, so the learning side
depends on nothing above it.

Cache layout under ``cache_dir``::

    <key>/                    arrays.npz (cand_train, noisy labels, soft labels) + meta.json
    clip_probs/<probs key>/   arrays.npz (probs_train, probs_test: (N, T, C) float16) + meta.json
    vlm_outputs/<key>/        the vlm annotator's: probs_* (score) or answers_* (generate) + meta.json

An annotation's meta names its model outputs entry (``probs_key``, in ``probs_dir``; default
``clip_probs``).

Entries are written atomically (a temporary sibling directory renamed into place), so concurrent
writers of one key are safe: the first rename wins and both hold identical content.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class Target(str, enum.Enum):
    """What a method learns from (``AlgorithmSpec.consumes``); the value is the name in configs and tags."""

    CAND = "cand"
    """Candidate sets: the union of the annotator's answers (synthetic, given or VLM)."""
    NOISY_LABEL = "noisy_label"
    """One noisy label per sample: the argmax of the VLM's template ``single_template``."""
    NOISY_LABEL_AVG = "noisy_label_avg"
    """One noisy label per sample: the argmax of the VLM's template-averaged probabilities."""
    SOFT = "soft"
    """The VLM's template-averaged class probabilities (distillation)."""
    SOFT_SINGLE = "soft_single"
    """The VLM's class probabilities of template ``single_template`` (distillation)."""

    def __str__(self) -> str:
        return self.value

    @property
    def from_vlm(self) -> bool:
        """Only a VLM annotation (per-template probabilities) gives this kind."""
        return self is not Target.CAND

    @property
    def single_template(self) -> bool:
        return self in (Target.NOISY_LABEL, Target.SOFT_SINGLE)

    @property
    def is_soft(self) -> bool:
        return self in (Target.SOFT, Target.SOFT_SINGLE)

    @property
    def averaged(self) -> "Target":
        """The template-average kind of a single-template kind (the starred rows: KD*, DivideMix*)."""
        return {Target.NOISY_LABEL: Target.NOISY_LABEL_AVG, Target.SOFT_SINGLE: Target.SOFT}.get(self, self)


@dataclass
class Annotation:
    """What an annotator says about the training pool (and, for a VLM, the test set)."""

    key: str
    cached: bool
    """True when the whole entry was read from the cache."""
    cand_train: np.ndarray  # (N, C) bool
    noisy_label: np.ndarray | None = None  # (N,) int64, argmax of template ``single_template``
    noisy_label_avg: np.ndarray | None = None  # (N,) int64, argmax of the template average
    soft_train: np.ndarray | None = None  # (N, C) float32, template-averaged probabilities
    soft_single_train: np.ndarray | None = None  # (N, C) float32, probabilities of template ``single_template``
    probs_train: np.ndarray | None = None  # (N, T, C) float16
    probs_test: np.ndarray | None = None  # (M, T, C) float16
    answers_train: np.ndarray | None = None  # (N, T) int16, a generating VLM's parsed answers, -1 unparseable
    answers_test: np.ndarray | None = None  # (M, T) int16
    stats: dict[str, float] = field(default_factory=dict)
    """partial_acc, mean_set_size, eta_realised, num_train, num_test (+ zs_acc_* for a VLM)."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.cand_train.shape[0]

    @property
    def num_classes(self) -> int:
        return self.cand_train.shape[1]

    def _vlm_array(self, target: Target) -> np.ndarray:
        value = {
            Target.NOISY_LABEL: self.noisy_label,
            Target.NOISY_LABEL_AVG: self.noisy_label_avg,
            Target.SOFT: self.soft_train,
            Target.SOFT_SINGLE: self.soft_single_train,
        }[target]
        if value is None:
            raise ValueError(
                f"annotation {self.key} ({self.meta.get('kind', '?')} annotator) has no {target.value!r}; "
                "only a VLM annotator gives noisy labels and soft labels"
            )
        return value

    def label_sets(self, target: Target) -> np.ndarray:
        """(N, C) float32 {0, 1} sets a method of kind ``target`` trains on: the candidate sets, or
        the singleton of the noisy label (for soft kinds: of the probabilities' argmax)."""
        target = Target(target)
        if target is Target.CAND:
            return self.cand_train.astype(np.float32)
        value = self._vlm_array(target)
        labels = value.argmax(1) if target.is_soft else value
        return np.eye(self.num_classes, dtype=np.float32)[labels]

    def soft_targets(self, target: Target) -> np.ndarray:
        """(N, C) float32 annotator probabilities of a soft kind."""
        target = Target(target)
        if not target.is_soft:
            raise ValueError(f"target kind {target.value!r} has no soft labels; soft kinds: soft, soft_single")
        return self._vlm_array(target).astype(np.float32)

    def class_probs(self, target: Target, split: str) -> np.ndarray:
        """(n, C) float32 zero-shot class probabilities of the ``train`` or ``test`` split behind the
        VLM target kind ``target``: template ``single_template`` or the template average; each row
        renormalised after fp16 storage. Needs the per-template probabilities."""
        target = Target(target)
        if not target.from_vlm:
            raise ValueError("no class probabilities behind candidate sets; VLM kinds: noisy_label, noisy_label_avg, soft, soft_single")
        probs = {"train": self.probs_train, "test": self.probs_test}[split]
        if probs is None:
            raise ValueError(
                f"annotation {self.key} ({self.meta.get('kind', '?')} annotator) has no per-template "
                "probabilities (only VLM annotations have them; load them with with_probs=True)"
            )
        if target.single_template:
            return renormalised(probs[:, self.meta["annotator"]["single_template"]])
        return renormalised(probs.astype(np.float32).mean(axis=1))


def renormalised(probs: np.ndarray) -> np.ndarray:
    """(N, C) float32 rows summing to 1 (after fp16 storage)."""
    probs = probs.astype(np.float32)
    return probs / probs.sum(axis=1, keepdims=True)


class CorruptEntryError(ValueError):
    """A cache entry that cannot be trusted: unreadable, truncated, or its arrays do not match the
    checksums written with them. The annotation stage moves it aside and computes it again."""

    def __init__(self, entry: Path, reason: str):
        super().__init__(f"annotation cache entry {entry} is corrupt ({reason})")
        self.entry = entry


def checksum(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def write_entry(final: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write arrays.npz + meta.json (with every array's checksum) into a temporary sibling
    directory, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "checksums": {name: checksum(np.asarray(a)) for name, a in arrays.items()}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # Another process wrote the same key first; its content is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(final: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and meta of an entry, or None when it is not there. Raises
    :class:`CorruptEntryError` when it is there but unreadable or its arrays fail their checksums
    (entries written before checksums existed are read unchecked)."""
    if not (final / "meta.json").is_file():
        return None
    try:
        meta = json.loads((final / "meta.json").read_text())
        with np.load(final / "arrays.npz", allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptEntryError(final, f"{type(err).__name__}: {err}") from None
    expected = meta.get("checksums") if isinstance(meta, dict) else None
    if expected is not None:
        if set(expected) != set(arrays):
            raise CorruptEntryError(final, f"arrays {sorted(arrays)} != recorded {sorted(expected)}")
        bad = [name for name, a in arrays.items() if checksum(a) != expected[name]]
        if bad:
            raise CorruptEntryError(final, f"checksum mismatch of {', '.join(bad)}")
    return arrays, meta


def move_aside(entry: Path) -> Path:
    """Rename a corrupt entry to ``<name>.corrupt-<time>`` (kept for inspection, never read again)."""
    aside = entry.with_name(f"{entry.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.rename(entry, aside)
    return aside


def load_cached(cache_dir: Path, key: str, *, with_probs: bool = True) -> Annotation:
    """The cached annotation ``key`` (as the annotation stage wrote it), with ``cached=True``.

    ``with_probs=False`` skips the per-template probabilities of a VLM annotation (the largest
    arrays: N x T x C float16), for consumers that need only the sets and labels.
    """
    cache_dir = Path(cache_dir)
    found = read_entry(cache_dir / key)
    if found is None:
        raise FileNotFoundError(
            f"annotation {key} is not in the cache {cache_dir} (no {cache_dir / key / 'meta.json'}); "
            "the driver's annotation stage must run before the trials, on a file system they share"
        )
    arrays, meta = found
    probs: dict[str, np.ndarray] = {}
    if with_probs and meta.get("probs_key"):
        where = cache_dir / meta.get("probs_dir", "clip_probs")
        probs_found = read_entry(where / meta["probs_key"])
        if probs_found is None:
            raise FileNotFoundError(f"annotation {key}: its model outputs {meta['probs_key']} are missing from {where}")
        probs = probs_found[0]
    return Annotation(key=key, cached=True, stats=meta["stats"], meta=meta, **arrays, **probs)
