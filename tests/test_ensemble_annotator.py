"""Annotator ensembles and PartialCLIP's zero-shot pre-filter on hand-made candidate sets and
probabilities (the members' annotations are made by hand; no model runs)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.annotation import ensemble_stage
from orchestrator.annotation.candidates import prefilter
from orchestrator.annotation.ensemble_stage import combine_sets
from orchestrator.annotation.stage import annotate, annotation_key
from orchestrator.config import EnsembleAnnotatorSpec, parse_grid
from trainables.data.annotation import Annotation, load_cached
from trainables.data.datasets import Dataset

A = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
B = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)


def test_union_and_intersection_of_hand_made_sets():
    union, empty = combine_sets([A, B], "union")
    assert union.astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]] and empty == 0.0
    inter, empty = combine_sets([A, B], "intersection")
    # row 1: the members disagree completely, so the sample keeps the union
    assert inter.astype(int).tolist() == [[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    assert empty == pytest.approx(1 / 3)


def test_prefilter_keeps_the_top_fraction_by_zero_shot_score():
    cand = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=bool)
    scores = np.array([[0.1, 0.4, 0.3, 0.2], [0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1]])
    half = prefilter(cand, scores, 0.5)  # top 2 of 4 classes
    assert half.astype(int).tolist() == [
        [0, 1, 1, 0],
        [1, 0, 0, 0],  # neither candidate is in the top 2: keep the better-scored one (class 0 > class 3)
        [0, 0, 0, 1],  # the only candidate is never removed
    ]
    assert np.array_equal(prefilter(cand, scores, 1.0), cand)
    assert prefilter(cand, scores, 0.1).sum(1).tolist() == [1, 1, 1]  # ceil(0.1 * 4) = 1 class
    with pytest.raises(ValueError, match="fraction"):
        prefilter(cand, scores, 0.0)


def member(key: str, cand: np.ndarray, probs: np.ndarray | None) -> Annotation:
    return Annotation(key=key, cached=True, cand_train=cand, probs_train=probs, probs_test=probs, meta={"kind": "clip"})


@pytest.fixture
def world(monkeypatch, tmp_path):
    """A 3-sample, 4-class data set and two members (CLIP-like with 2 and 3 templates)."""
    y = np.array([1, 0, 3])
    ds = Dataset(
        name="digits", train_x=np.zeros((3, 1, 8, 8), np.uint8), train_y=y, test_x=np.zeros((3, 1, 8, 8), np.uint8),
        test_y=y, class_names=("a", "b", "c", "d"), mean=(0.5,), std=(0.5,), hflip=False, default_backbone="small_cnn",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    pa = rng.dirichlet(np.ones(4), size=(3, 2)).astype(np.float16)  # (N, T=2, C)
    pb = rng.dirichlet(np.ones(4), size=(3, 3)).astype(np.float16)
    members = {"clip": member("ka", A, pa), "llava": member("kb", B, pb)}
    monkeypatch.setattr(ensemble_stage, "annotate", lambda dataset, spec, **kw: members[spec.name])
    return ds, members, tmp_path


def ensemble(**kw) -> EnsembleAnnotatorSpec:
    members = [{"kind": "clip", "name": "clip"}, {"kind": "vlm", "name": "llava", "answer_mode": "score"}]
    return EnsembleAnnotatorSpec(kind="ensemble", members=members, **kw)


def test_union_ensemble_record(world):
    ds, members, cache = world
    ann = annotate(ds, ensemble(), cache_dir=cache)
    assert np.array_equal(ann.cand_train, A | B)
    # every member gives probabilities: each member's template average is one "template" of the ensemble
    avg = np.stack([members["clip"].probs_train.astype(np.float32).mean(1), members["llava"].probs_train.astype(np.float32).mean(1)], 1)
    assert ann.probs_train.shape == (3, 2, 4) and np.allclose(ann.probs_train, avg, atol=1e-3)
    assert np.array_equal(ann.noisy_label, avg[:, 0].argmax(1))
    assert np.array_equal(ann.noisy_label_avg, avg.mean(1).argmax(1))
    assert ann.stats["partial_acc"] == pytest.approx((A | B)[np.arange(3), [1, 0, 3]].mean())
    assert ann.stats["zs_acc_avg_test"] == pytest.approx((avg.mean(1).argmax(1) == [1, 0, 3]).mean())
    again = load_cached(cache, ann.key)
    assert np.array_equal(again.cand_train, ann.cand_train) and again.stats == ann.stats


def test_intersection_mean_probs_and_prefilter(world):
    ds, members, cache = world
    inter = annotate(ds, ensemble(combine="intersection"), cache_dir=cache)
    assert np.array_equal(inter.cand_train, combine_sets([A, B], "intersection")[0])
    assert inter.stats["empty_intersection_frac"] == pytest.approx(1 / 3)
    mean = annotate(ds, ensemble(combine="mean_probs", candidate_mode="top_k", top_k=2), cache_dir=cache)
    avg = (members["clip"].probs_train.astype(np.float32).mean(1) + members["llava"].probs_train.astype(np.float32).mean(1)) / 2
    assert np.array_equal(np.sort(np.argsort(-avg, 1)[:, :2], 1), np.sort(np.argwhere(mean.cand_train)[:, 1].reshape(3, 2), 1))
    filtered = annotate(ds, ensemble(prefilter_fraction=0.25), cache_dir=cache)
    assert np.array_equal(filtered.cand_train, prefilter(A | B, avg, 0.25))
    assert filtered.stats["prefilter_removed"] == pytest.approx(((A | B).sum(1) - filtered.cand_train.sum(1)).mean())
    keys = {inter.key, mean.key, filtered.key, annotation_key(ds, ensemble())}
    assert len(keys) == 4


def test_ensemble_without_probabilities_gives_sets_only(world, monkeypatch):
    ds, members, cache = world
    members["llava"] = member("kb", B, None)  # a generating VLM: no probabilities
    ann = annotate(ds, ensemble(), cache_dir=cache)
    assert np.array_equal(ann.cand_train, A | B) and ann.probs_train is None and ann.noisy_label is None
    assert "zs_acc_test" not in ann.stats


def test_grid_compares_clip_vlm_and_their_ensemble():
    clip = {"kind": "clip", "name": "clip"}
    llava = {"kind": "vlm", "name": "llava", "answer_mode": "score"}
    grid = parse_grid(
        {
            "experiment": "x",
            "datasets": [{"name": "digits"}],
            "annotators": [clip, llava, {"kind": "ensemble", "name": "clip+llava", "members": [clip, llava]}],
            "methods": [{"name": "coreg"}, {"name": "kd"}],
        }
    )
    from orchestrator.plan import expand

    assert sorted({s.cell.annotator.name for s in expand(grid)}) == ["clip", "clip+llava", "llava"]
