"""The annotation stage of the ``ensemble`` annotator: several CLIP / VLM annotators as one.

Each member is annotated (and cached) on its own by :func:`orchestrator.annotation.stage.annotate`;
the ensemble's entry holds only what is combined:

- ``union`` / ``intersection`` of the members' candidate sets (a sample whose intersection is
  empty keeps the union: the members disagree completely; counted as ``empty_intersection_frac``);
- ``mean_probs``: each member's template-averaged probabilities become one "template" of the
  ensemble, probs (N, M, C); ``candidate_mode`` applies to them (``top_k`` / ``prob_ratio`` on their
  mean, ``multi_prompt`` the union of each member's argmax).

When every member gives probabilities, the ensemble stores probs (N, M, C) for train and test, so
its noisy and soft labels (``single_template`` = a member) and its zero-shot statistics derive as
for CLIP; ``zero-shot*`` is then the mean over members. ``prefilter_fraction`` then applies
PartialCLIP's zero-shot pre-filter (:func:`candidates.prefilter`) to the sets with the mean of the
members that give probabilities as the zero-shot score.

Ground-truth labels are read only for the statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchestrator.annotation import candidates as cands
from orchestrator.annotation.stage import _versions, annotate, dataset_candidate_stats, derived_from_probs
from orchestrator.config import EnsembleAnnotatorSpec
from trainables.data.annotation import Annotation, load_cached, write_entry
from trainables.data.datasets import Dataset


def combine_sets(sets: list[np.ndarray], how: str) -> tuple[np.ndarray, float]:
    """(N, C) union or intersection of the members' sets, and the fraction of empty intersections
    (those samples keep the union)."""
    union = np.logical_or.reduce(sets)
    if how == "union":
        return union, 0.0
    inter = np.logical_and.reduce(sets)
    empty = ~inter.any(axis=1)
    inter[empty] = union[empty]
    return inter, float(empty.mean())


def _averaged(ann: Annotation, split: str) -> np.ndarray | None:
    """(n, C) a member's template-averaged probabilities of a split (None: it gives none)."""
    probs = ann.probs_train if split == "train" else ann.probs_test
    return None if probs is None else cands.average_probs(probs)


def annotate_ensemble(
    dataset: Dataset,
    spec: EnsembleAnnotatorSpec,
    key: str,
    entry: Path,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> Annotation:
    """The annotation ``key`` of ``dataset`` by an ensemble (see the module docstring)."""
    members = [annotate(dataset, m, cache_dir=cache_dir, progress=progress) for m in spec.members]
    if (entry / "meta.json").is_file():
        return load_cached(cache_dir, key)
    start = time.time()
    averaged = {s: [_averaged(m, s) for m in members] for s in ("train", "test")}
    arrays: dict[str, np.ndarray] = {}
    stats: dict[str, float] = {}
    if all(a is not None for a in averaged["train"]):
        probs_train = np.stack(averaged["train"], axis=1).astype(np.float16)  # (N, M, C)
        probs_test = np.stack(averaged["test"], axis=1).astype(np.float16)
        arrays, stats = derived_from_probs(dataset, spec, probs_train, probs_test)
        arrays.update(probs_train=probs_train, probs_test=probs_test)
    if spec.combine != "mean_probs":
        arrays["cand_train"], stats["empty_intersection_frac"] = combine_sets([m.cand_train for m in members], spec.combine)
    if spec.prefilter_fraction is not None:
        scores = np.mean([a for a in averaged["train"] if a is not None], axis=0)  # (N, C)
        before = arrays["cand_train"]
        arrays["cand_train"] = cands.prefilter(before, scores, spec.prefilter_fraction)
        stats["prefilter_removed"] = float((before.sum(1) - arrays["cand_train"].sum(1)).mean())
    stats.update(dataset_candidate_stats(dataset, arrays["cand_train"]))
    stats.update(num_train=float(len(dataset.train_y)), num_test=float(len(dataset.test_y)))
    meta = {
        "key": key, "kind": "ensemble", "annotator": spec.model_dump(mode="json"), "dataset": dataset.identity,
        "members": [m.key for m in members], "stats": stats, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - start, "versions": _versions(),
    }  # fmt: skip
    write_entry(entry, arrays, meta)
    return Annotation(key=key, cached=False, stats=stats, meta=meta, **arrays)
