"""The synthetic generators beyond flip (pico_plus, uniform, instance_dependent) and the long-tailed
training pool: statistics on 100,000-200,000 samples against their closed forms, as flip's are
(``tests/test_annotation.py``), and the grid and annotation-stage plumbing of each generator."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from orchestrator.annotation import synthetic
from orchestrator.annotation.stage import annotate, annotation_key
from orchestrator.config import GridError, SyntheticAnnotatorSpec, parse_grid
from orchestrator.plan import expand
from trainables.data.datasets import load_dataset, long_tailed_counts
from trainables.data.spec import DatasetSpec

N, C = 200_000, 10


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(321).integers(0, C, N)


def _se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def _stats(cand: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(realised eta, mean |S|)."""
    return 1.0 - cand[np.arange(len(labels)), labels].mean(), cand.sum(1).mean()


# ------------------------------------------------------------------------------------- pico_plus


@pytest.mark.parametrize("q, eta", [(0.1, 0.3), (0.3, 0.2), (0.02, 0.5)])
def test_pico_plus_statistics(labels, q, eta):
    cand = synthetic.pico_plus_candidates(labels, C, q, eta, np.random.default_rng(0))
    assert cand.shape == (N, C) and cand.dtype == bool and cand.any(1).all()  # never empty
    a = (1 - q) ** (C - 1)  # P(no wrong label joins)
    expected_eta = eta * (1 - a) / (1 - eta * a)  # empty rows are redrawn: conditioned on non-empty
    expected_size = ((1 - eta) + q * (C - 1)) / (1 - eta * a)
    eta_hat, size_hat = _stats(cand, labels)
    assert abs(eta_hat - expected_eta) < 5 * _se(expected_eta, N)
    assert abs(size_hat - expected_size) < 5 * (1 + q * C) ** 0.5 / N**0.5
    assert expected_eta < eta and eta_hat < eta  # below the nominal eta: not flip's generator


def test_pico_plus_wrong_labels_join_independently_and_uniformly(labels):
    cand = synthetic.pico_plus_candidates(labels, C, 0.2, 0.0, np.random.default_rng(1))
    assert cand[np.arange(N), labels].all()  # eta = 0: plain PLL, the true label always in S
    wrong = cand.copy()
    wrong[np.arange(N), labels] = False
    per_class = wrong.sum(0) / (N - np.bincount(labels, minlength=C))  # P(j in S | j != y)
    assert np.abs(per_class - 0.2).max() < 5 * _se(0.2, N // C * (C - 1))
    with pytest.raises(ValueError, match="only draw empty sets"):
        synthetic.pico_plus_candidates(labels[:10], C, 0.0, 1.0, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- uniform


def test_uss_size_distribution_matches_the_reference_formula():
    for c in (3, 10, 100, 1000):
        p = synthetic.uss_size_probs(c)
        assert len(p) == c - 1 and abs(p.sum() - 1) < 1e-12
        assert abs((np.arange(1, c) * p).sum() - c / 2) < 1e-9 * c  # E|S| = C / 2
    assert np.allclose(synthetic.uss_size_probs(10), [comb(10, k) / (2**10 - 2) for k in range(1, 10)])


@pytest.mark.parametrize("eta", [0.0, 0.2])
def test_uniform_statistics(labels, eta):
    cand = synthetic.uniform_candidates(labels, C, eta, np.random.default_rng(2))
    eta_hat, size_hat = _stats(cand, labels)
    assert abs(eta_hat - eta) < 5 * _se(max(eta, 1e-3), N)  # exact: S is never full
    sizes = cand.sum(1)
    assert sizes.min() >= 1 and sizes.max() <= C - 1
    expected = synthetic.uss_size_probs(C)
    observed = np.bincount(sizes, minlength=C)[1:C] / N
    assert np.abs(observed - expected).max() < 5 * max(_se(p, N) for p in expected)
    assert abs(size_hat - C / 2) < 0.02


def test_uniform_wrong_labels_are_uniform_among_the_others():
    y = np.zeros(100_000, dtype=np.int64)
    cand = synthetic.uniform_candidates(y, C, 0.0, np.random.default_rng(3))
    counts = cand[:, 1:].sum(0)  # each wrong label equally often
    assert np.abs(counts / counts.mean() - 1).max() < 0.02


# ----------------------------------------------------------------------------- instance_dependent


def test_instance_dependent_follows_valen_rates():
    rng = np.random.default_rng(4)
    n = 100_000
    y = rng.integers(0, C, n)
    probs = rng.dirichlet(np.full(C, 0.5), n)  # (N, C) a helper's probabilities
    q = 0.1
    rates = synthetic.flip_rates(y, probs, q)
    assert (rates[np.arange(n), y] == 0).all() and rates.max() <= 1.0
    cand = synthetic.instance_dependent_candidates(y, probs, q, 0.0, np.random.default_rng(5))
    eta_hat, size_hat = _stats(cand, y)
    assert eta_hat == 0.0  # VALEN's sets always hold the true label
    assert abs(size_hat - (1 + rates.sum(1).mean())) < 5 * (rates * (1 - rates)).sum(1).mean() ** 0.5 / n**0.5
    unclipped = (rates < 1).all(1)
    assert abs(rates[unclipped].sum(1).mean() - q * C) < 1e-9  # unclipped rows: E|S| = 1 + q C
    # The label the helper finds most likely (after the truth) joins with rate min(1, q C / sum r).
    wrong = probs.copy()
    wrong[np.arange(n), y] = -1
    top = wrong.argmax(1)
    joined = cand[np.arange(n), top].mean()
    assert abs(joined - rates[np.arange(n), top].mean()) < 5 * _se(joined, n)
    lowest = np.where(wrong < 0, np.inf, wrong).argmin(1)
    assert cand[np.arange(n), lowest].mean() < joined / 5  # instance-dependent, not uniform


def test_instance_dependent_noise_follows_the_helper():
    n = 60_000
    y = np.zeros(n, dtype=np.int64)
    probs = np.tile(np.array([0.5, 0.3] + [0.2 / (C - 2)] * (C - 2)), (n, 1))
    cand = synthetic.instance_dependent_candidates(y, probs, 0.0, 1.0, np.random.default_rng(6))
    assert not cand[:, 0].any() and (cand.sum(1) == 1).all()  # q = 0, eta = 1: one swapped-in label
    share = cand[:, 1].mean()  # drawn in proportion to the probabilities outside S
    assert abs(share - 0.3 / 0.5) < 5 * _se(0.6, n)


def test_helper_confidences_are_cross_fitted_and_informative():
    ds = load_dataset(DatasetSpec(name="digits"))
    probs = synthetic.helper_confidences(ds.train_x, ds.train_y, 10, seed=0)
    assert probs.shape == (len(ds.train_y), 10) and np.allclose(probs.sum(1), 1)
    acc = (probs.argmax(1) == ds.train_y).mean()
    assert 0.85 < acc < 0.995  # held-out predictions: good but not a memorised training fit
    again = synthetic.helper_confidences(ds.train_x, ds.train_y, 10, seed=0)
    assert np.array_equal(probs, again)


# ---------------------------------------------------------------------------------- long-tailed


def test_long_tailed_counts_follow_the_exponential_profile():
    counts = np.full(10, 5000)
    take = long_tailed_counts(counts, 100.0)
    assert take[0] == 5000 and take[-1] == 50 and (np.diff(take) < 0).all()  # CIFAR-10-LT, ratio 100
    assert take.tolist() == [int(np.floor(5000 * 100 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert long_tailed_counts(counts, 1.0).tolist() == counts.tolist()
    assert long_tailed_counts(np.array([10, 3, 10]), 2.0).tolist() == [10, 3, 5]  # capped at what a class has


def test_long_tailed_training_pool_per_class_counts():
    balanced = load_dataset(DatasetSpec(name="digits"))
    lt = load_dataset(DatasetSpec(name="digits", imbalance_ratio=10.0))
    counts = np.bincount(lt.train_y, minlength=10)
    assert counts.tolist() == long_tailed_counts(np.bincount(balanced.train_y, minlength=10), 10.0).tolist()
    assert counts[0] / counts[-1] == pytest.approx(10.0, rel=0.1)
    assert np.array_equal(lt.test_y, balanced.test_y)  # the test set is kept balanced
    assert lt.identity["imbalance_ratio"] == 10.0 and lt.identity["sha256"] != balanced.identity["sha256"]
    rows = {x.tobytes() for x in balanced.train_x}
    assert all(x.tobytes() in rows for x in lt.train_x)  # a subset of the pool
    other = load_dataset(DatasetSpec(name="digits", imbalance_ratio=10.0, subsample_seed=1))
    assert np.bincount(other.train_y).tolist() == counts.tolist() and other.identity["sha256"] != lt.identity["sha256"]


# ------------------------------------------------------------------------------- grid and stage


def grid(generator: str, axes: dict, datasets=({"name": "digits"},)) -> dict:
    return {
        "experiment": "g",
        "datasets": list(datasets),
        "annotators": [{"kind": "synthetic", "name": generator, "generator": generator}],
        "grid": axes,
        "methods": [{"name": "cc"}],
    }


def test_each_generator_is_a_grid_option_and_uniform_has_no_q():
    for g in ("flip", "pico_plus", "instance_dependent"):
        studies = expand(parse_grid(grid(g, {"q": [0.1, 0.3], "eta": [0.2]})))
        assert sorted(s.cell.q for s in studies) == [0.1, 0.3]
    studies = expand(parse_grid(grid("uniform", {"eta": [0.0, 0.2]})))
    assert [(s.cell.q, s.cell.eta) for s in studies] == [(None, 0.0), (None, 0.2)]
    assert studies[0].cell.label() == "digits uniform eta=0 seed=0"
    with pytest.raises(GridError, match="grid.q: the uniform generator has no q"):
        parse_grid(grid("uniform", {"q": [0.1], "eta": [0.2]}))
    with pytest.raises(GridError, match="grid.q: required by the synthetic annotator"):
        parse_grid(grid("pico_plus", {"eta": [0.2]}))
    with pytest.raises(GridError, match="generator: Input should be 'flip', 'pico_plus', 'uniform' or 'instance_dependent'"):
        parse_grid(grid("fps", {"q": [0.1], "eta": [0.2]}))


@pytest.mark.parametrize("generator, q", [("pico_plus", 0.2), ("uniform", None), ("instance_dependent", 0.1)])
def test_stage_annotates_and_caches_each_generator(tmp_path, generator, q):
    ds = load_dataset(DatasetSpec(name="digits"))
    spec = SyntheticAnnotatorSpec(kind="synthetic", generator=generator)
    first = annotate(ds, spec, q=q, eta=0.2, seed=3, cache_dir=tmp_path)
    again = annotate(ds, spec, q=q, eta=0.2, seed=3, cache_dir=tmp_path)
    assert not first.cached and again.cached and np.array_equal(first.cand_train, again.cand_train)
    flip = annotation_key(ds, SyntheticAnnotatorSpec(kind="synthetic"), q=q or 0.2, eta=0.2, seed=3)
    assert first.key != flip and first.key != annotation_key(ds, spec, q=q, eta=0.2, seed=4)
    assert first.cand_train.any(1).all() and 0.0 < first.stats["eta_realised"] < 0.3
    with pytest.raises(ValueError, match=f"needs {'eta and no q' if q is None else 'q and eta'}"):
        annotate(ds, spec, q=None if q else 0.1, eta=0.2, cache_dir=tmp_path)


def test_instance_dependent_grid_keeps_older_signatures_and_refuses_misplaced_confidences():
    assert "confidences" not in SyntheticAnnotatorSpec(kind="synthetic").model_dump()  # flip cells hash as before
    bad = grid("flip", {"q": [0.1], "eta": [0.1]})
    bad["annotators"][0]["confidences"] = {"kind": "clip"}
    with pytest.raises(GridError, match="confidences: applies only to the instance_dependent generator, not to flip"):
        parse_grid(bad)
    lost = grid("instance_dependent", {"q": [0.1], "eta": [0.1]}, datasets=({"name": "lost"},))
    lost["annotators"][0]["confidences"] = {"kind": "clip", "pretrained": None}
    with pytest.raises(GridError, match=r"annotators\[0\].confidences: a CLIP annotator, and dataset lost has features"):
        parse_grid(lost)


@pytest.mark.ray
def test_instance_dependent_from_a_clip_annotators_probabilities(ray_session, tmp_path):
    """VALEN's rule on a (tiny, random) CLIP model's template-averaged probabilities instead of the helper's."""
    from pathlib import Path

    from orchestrator.annotation.stage import synthetic_candidates
    from orchestrator.config import ClipAnnotatorSpec

    clip = ClipAnnotatorSpec(
        kind="clip", pretrained=None, model_config_path=str(Path(__file__).parent / "fixtures" / "tiny_clip.json"), batch_size=32
    )
    ds = load_dataset(DatasetSpec(name="digits", subsample=120, test_subsample=20))
    spec = SyntheticAnnotatorSpec(kind="synthetic", generator="instance_dependent", confidences=clip)
    ann = annotate(ds, spec, q=0.2, eta=0.1, seed=1, cache_dir=tmp_path)
    vlm = annotate(ds, clip, cache_dir=tmp_path)  # the CLIP annotation was made (and cached) on the way
    assert vlm.cached
    expected = synthetic_candidates(ds, "instance_dependent", 0.2, 0.1, 1, probs=vlm.soft_train)
    assert np.array_equal(ann.cand_train, expected)
    helper = annotate(ds, SyntheticAnnotatorSpec(kind="synthetic", generator="instance_dependent"), q=0.2, eta=0.1, seed=1, cache_dir=tmp_path)
    assert helper.key != ann.key and not np.array_equal(helper.cand_train, ann.cand_train)


def test_table_columns_leave_out_the_q_a_generator_does_not_have():
    from types import SimpleNamespace

    from orchestrator import report

    def run(run_id, annotator, q):
        tags = {"method": "cc", "dataset": "digits", "annotator": annotator, "seed": "0", "split": "", "q": q, "eta": "0.1",
                "shots": "0", "fraction": "1", "objective": "val/covering_rate"}  # fmt: skip
        metrics = {"test/acc": 0.5, "test/acc_selected": 0.5, "val/covering_rate": 0.9}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="FINISHED"), data=SimpleNamespace(tags=tags, metrics=metrics))

    tables, _ = report.build([run("a", "uss", ""), run("b", "picoplus", "0.2")], [])
    assert sorted(tables.columns_order) == ["picoplus q=0.2 eta=0.1", "uss eta=0.1"]


def test_imbalance_ratio_axis_makes_one_column_per_ratio(tmp_path):
    from orchestrator.sweep import check_inputs

    raw = grid("uniform", {"eta": [0.1], "imbalance_ratio": [1, 10, 50]},
               datasets=({"name": "digits"}, {"name": "digits", "label": "small", "subsample": 300}))  # fmt: skip
    raw["storage"] = str(tmp_path)
    g = parse_grid(raw)
    studies = expand(g)
    assert [s.cell.dataset.display for s in studies] == ["digits", "digits-LT10", "digits-LT50", "small", "small-LT10", "small-LT50"]
    loaded = check_inputs(g)  # every ratio is loaded (and checked) before Ray
    balanced = np.bincount(loaded[studies[0].cell.dataset].train_y, minlength=10)
    for s in studies[:3]:  # the entry without a subsample: exactly the profile's counts
        counts = np.bincount(loaded[s.cell.dataset].train_y, minlength=10)
        assert counts.tolist() == long_tailed_counts(balanced, s.cell.dataset.imbalance_ratio or 1.0).tolist()
    both = grid("flip", {"q": [0.1], "eta": [0.1], "imbalance_ratio": [10]}, datasets=({"name": "digits", "imbalance_ratio": 5},))
    with pytest.raises(GridError, match=r"datasets\[0\].imbalance_ratio: set both here and as the grid.imbalance_ratio axis"):
        parse_grid(both)
    with pytest.raises(GridError, match=r"grid.imbalance_ratio: imbalance_ratio = 0.5 is below 1"):
        parse_grid(grid("flip", {"q": [0.1], "eta": [0.1], "imbalance_ratio": [0.5]}))
