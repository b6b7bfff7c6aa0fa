"""Real-world partial-label data sets (lost, msrcv2): loading, the ``given`` annotator, grid checks, a tiny run.

Loader mechanics are pinned on a small hand-made .mat file written here (features encode the sample
index, so every split can be checked row by row); the shipped files are checked when present
(``$COREG_PLL_ROOT``, default ``/work/shared/data/pll``), and skipped otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.annotation.stage import annotate, annotation_key
from orchestrator.config import DatasetSpec, GivenAnnotatorSpec, GridError, parse_grid
from orchestrator.plan import expand
from trainables.common.augment import make_views
from trainables.data.datasets import DATASETS, DatasetNotFoundError, load_dataset

PLL_ROOT = Path(os.environ.get("COREG_PLL_ROOT", "/work/shared/data/pll"))
REAL = {"lost": (1122, 108, 16, 2.23), "msrcv2": (1758, 48, 23, 3.16)}
needs_files = pytest.mark.skipif(
    not (PLL_ROOT / "lost.mat").is_file() or not (PLL_ROOT / "MSRCv2.mat").is_file(),
    reason=f"lost.mat / MSRCv2.mat not in {PLL_ROOT} (set COREG_PLL_ROOT)",
)


def write_fake_lost(root: Path, n: int = 60, folds: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A lost.mat-shaped file: 108 features whose column 0 is the 1-based sample index, 16 classes,
    5 disjoint test folds covering every sample. Returns the arrays written (0-based indices)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    y = np.arange(n) % 16
    x = rng.normal(size=(n, 108)) * rng.uniform(1.0, 100.0, size=108) + 50.0
    x[:, 0] = np.arange(1, n + 1)
    cand = (rng.random((n, 16)) < 0.15).astype(float)
    cand[np.arange(n), y] = 1.0
    test_folds = np.array_split(rng.permutation(n), folds)
    tr = np.empty((1, folds), dtype=object)
    te = np.empty((1, folds), dtype=object)
    for k, fold in enumerate(test_folds):
        te[0, k] = (np.sort(fold) + 1)[None, :]
        tr[0, k] = (np.setdiff1d(np.arange(n), fold) + 1)[None, :]
    root.mkdir(parents=True, exist_ok=True)
    savemat(root / "lost.mat", {"features": x, "p_labels": cand, "logitlabels": np.eye(16)[y], "tr": tr, "te": te})
    return {"x": x, "y": y, "cand": cand.astype(bool), "test_folds": [np.sort(f) for f in test_folds]}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("pll")
    return root, write_fake_lost(root)


def rows(ds) -> tuple[np.ndarray, np.ndarray]:
    """0-based sample ids of the training and test parts (column 0 of the fake features)."""
    return ds.train_x[:, 0].astype(int) - 1, ds.test_x[:, 0].astype(int) - 1


# ------------------------------------------------------------------------------------- loading


def test_registry_describes_feature_datasets_with_shipped_sets_and_splits():
    for name, (_, dim, classes, _) in REAL.items():
        info = DATASETS[name]
        assert (info.kind, info.feature_dim, info.num_classes, info.splits) == ("features", dim, classes, 5)
        assert info.default_backbone == "mlp" and info.has_candidates
        assert info.class_names[:2] == ("class 0", "class 1")
    assert not any(DATASETS[n].has_candidates or DATASETS[n].splits for n in ("digits", "cifar10", "svhn"))


def test_each_split_takes_its_rows_and_the_shipped_sets(fake):
    root, truth = fake
    seen_test = []
    for k in range(5):
        ds = load_dataset(DatasetSpec(name="lost", root=str(root), split=k))
        train, test = rows(ds)
        assert np.array_equal(test, truth["test_folds"][k])  # 1-based MATLAB indices read as 0-based
        assert not set(train) & set(test) and len(train) + len(test) == 60
        assert np.array_equal(ds.train_y, truth["y"][train]) and np.array_equal(ds.test_y, truth["y"][test])
        assert np.array_equal(ds.train_cand, truth["cand"][train])
        assert ds.train_x.dtype == np.float32 and ds.kind == "features" and ds.num_classes == 16
        assert ds.identity["split"] == {"predefined": k, "of": 5}
        seen_test.append(test)
    assert np.array_equal(np.sort(np.concatenate(seen_test)), np.arange(60))


def test_standardisation_uses_training_statistics_only(fake, tmp_path):
    root, truth = fake
    ds = load_dataset(DatasetSpec(name="lost", root=str(root), split=2))
    train, _ = rows(ds)
    x_train = truth["x"][train]
    assert np.allclose(ds.mean, x_train.mean(axis=0), rtol=1e-5)
    assert np.allclose(ds.std, x_train.std(axis=0), rtol=1e-4)
    # Changing the test rows changes nothing in the statistics.
    other = write_fake_lost(tmp_path, seed=0)
    from scipy.io import loadmat, savemat

    mat = loadmat(tmp_path / "lost.mat")
    mat["features"][other["test_folds"][2]] *= 1000.0
    savemat(tmp_path / "lost.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    shifted = load_dataset(DatasetSpec(name="lost", root=str(tmp_path), split=2))
    assert shifted.mean == ds.mean and shifted.std == ds.std
    # The views standardise with them: training features come out with mean 0, std 1 per dimension.
    views = make_views("features", mean=ds.mean, std=ds.std, hflip=False, generator=torch.Generator())
    z = views.plain(torch.as_tensor(ds.train_x)).double()
    assert torch.allclose(z.mean(0), torch.zeros(108, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(108, dtype=torch.float64), atol=1e-3)


def test_global_scaling_keeps_the_relative_scales(fake):
    root, truth = fake
    ds = load_dataset(DatasetSpec(name="lost", root=str(root), split=0, feature_scaling="global"))
    train, _ = rows(ds)
    x_train = truth["x"][train]
    assert np.allclose(ds.mean, x_train.mean(axis=0), rtol=1e-5)
    assert np.allclose(ds.std, np.sqrt(x_train.var(axis=0).mean()), rtol=1e-4)  # one scale for all


def test_subsample_keeps_candidates_aligned(fake):
    root, truth = fake
    ds = load_dataset(DatasetSpec(name="lost", root=str(root), split=0, subsample=20))
    train, _ = rows(ds)
    assert len(train) == 20 and np.array_equal(ds.train_cand, truth["cand"][train])


def test_missing_or_broken_files_name_the_file_and_the_place(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"lost\.mat not found .*" + re.escape(str(tmp_path / "pll" / "lost.mat"))):
        load_dataset(DatasetSpec(name="lost", root=str(tmp_path)))
    with pytest.raises(DatasetNotFoundError, match="MSRCv2.mat not found"):
        load_dataset(DatasetSpec(name="msrcv2", root=str(tmp_path)))
    (tmp_path / "lost.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetNotFoundError, match="not a readable MATLAB v5 file"):
        load_dataset(DatasetSpec(name="lost", root=str(tmp_path)))


def test_zero_based_or_overlapping_split_indices_are_refused(tmp_path):
    from scipy.io import loadmat, savemat

    write_fake_lost(tmp_path)
    mat = {k: v for k, v in loadmat(tmp_path / "lost.mat").items() if not k.startswith("__")}
    mat["te"][0, 1] = mat["te"][0, 1] - 1  # 0-based indices: one of them becomes 0
    savemat(tmp_path / "lost.mat", mat)
    load_dataset(DatasetSpec(name="lost", root=str(tmp_path), split=0))  # split 0 is untouched
    with pytest.raises(ValueError, match="split 1 has indices outside 1..60 or shared by train and test"):
        load_dataset(DatasetSpec(name="lost", root=str(tmp_path), split=1))


def test_files_are_also_found_in_a_pll_subdirectory(tmp_path):
    write_fake_lost(tmp_path / "pll")
    assert load_dataset(DatasetSpec(name="lost", root=str(tmp_path))).num_classes == 16


@needs_files
@pytest.mark.parametrize("name", sorted(REAL))
def test_shipped_files(name):
    from scipy.io import loadmat

    n, dim, classes, mean_size = REAL[name]
    sets, test_rows = [], []
    for k in range(5):
        ds = load_dataset(DatasetSpec(name=name, root=str(PLL_ROOT), split=k))
        assert len(ds.train_y) + len(ds.test_y) == n and abs(len(ds.test_y) - n / 5) < 1
        assert ds.train_x.shape[1] == ds.test_x.shape[1] == dim and ds.num_classes == classes
        assert ds.train_cand[np.arange(len(ds.train_y)), ds.train_y].all()  # plain PLL: truth in S
        sets.append(ds.train_cand.sum(1))
        test_rows += [x.tobytes() + bytes([y]) for x, y in zip(ds.test_x, ds.test_y)]
    # The five test parts partition the data set (compared as a multiset: MSRCv2 repeats some rows).
    mat = loadmat(PLL_ROOT / DATASETS[name].file)
    whole = [x.tobytes() + bytes([y]) for x, y in zip(mat["features"].astype(np.float32), mat["logitlabels"].argmax(1))]
    assert sorted(test_rows) == sorted(whole)
    # Every sample is in the training part of 4 of the 5 splits.
    assert abs(np.concatenate(sets).mean() - mean_size) < 0.05


# ------------------------------------------------------------------------------ config + annotation


def grid(datasets, annotators=({"kind": "given"},), **extra) -> dict:
    return {
        "experiment": "real",
        "datasets": list(datasets),
        "annotators": list(annotators),
        "methods": [{"name": "cc"}],
        "training": {"batch_size": 16},  # the fake files hold 60 samples: a batch of 64 is refused
        **extra,
    }


def error_of(raw: dict) -> str:
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    return str(err.value)


def test_given_annotator_and_splits_are_accepted():
    g = parse_grid(grid([{"name": "lost", "split": k} for k in range(5)] + [{"name": "msrcv2"}]))
    assert [d.split for d in g.datasets] == [0, 1, 2, 3, 4, 0]  # msrcv2 defaults to split 0
    assert isinstance(g.annotators[0], GivenAnnotatorSpec)
    studies = expand(g)
    assert len({s.study_id for s in studies}) == 6 and {s.cell.q for s in studies} == {None}
    labels = [s.cell.label() for s in studies]
    assert "lost given split=3 seed=0" in labels
    # Splits are pooled like seeds in the summary: one row per data set.
    assert {s.cell.label(with_seed=False) for s in studies} == {"lost given", "msrcv2 given"}


@pytest.mark.parametrize(
    "raw, expected",
    [
        (grid([{"name": "digits"}]), "dataset digits ships no candidate sets (data sets that do: lost, msrcv2, pll_mat)"),
        (grid([{"name": "digits", "split": 1}]), "split: digits has no predefined train/test splits"),
        (grid([{"name": "lost", "split": 5}]), "split: lost has 5 predefined splits (0..4), got 5"),
        (grid([{"name": "lost", "split": 1}, {"name": "lost", "split": 1}]), "duplicate name(s) ['lost split 1']"),
        (grid([{"name": "lost"}], grid={"q": [0.1], "eta": [0.1]}), "grid.q: applies only to synthetic annotators"),
        (grid([{"name": "lost"}], [{"kind": "clip"}]), "dataset lost has features, not images"),
        (grid([{"name": "digits", "feature_scaling": "global"}], [{"kind": "clip"}]), "feature_scaling: digits has images"),
        (grid([{"name": "lost"}], [{"kind": "hand"}]), "allowed: synthetic, clip, given"),
    ],
)
def test_refusals_name_the_problem(raw, expected):
    assert expected in error_of(raw)


def test_synthetic_sets_on_feature_datasets_stay_possible():
    parse_grid(grid([{"name": "lost"}], [{"kind": "synthetic"}], grid={"q": [0.1], "eta": [0.2]}))


def test_given_annotation_is_the_shipped_sets_cached_per_split(fake, tmp_path):
    root, _ = fake
    spec = GivenAnnotatorSpec(kind="given")
    ds0 = load_dataset(DatasetSpec(name="lost", root=str(root), split=0))
    ds1 = load_dataset(DatasetSpec(name="lost", root=str(root), split=1))
    first = annotate(ds0, spec, cache_dir=tmp_path)
    assert not first.cached and np.array_equal(first.cand_train, ds0.train_cand)
    cand = ds0.train_cand
    assert first.stats["partial_acc"] == 1.0
    assert first.stats["mean_set_size"] == pytest.approx(cand.sum(1).mean())
    again = annotate(ds0, spec, seed=7, cache_dir=tmp_path)  # the seed does not matter
    assert again.cached and again.key == first.key and np.array_equal(again.cand_train, cand)
    assert annotation_key(ds1, spec) != first.key
    with pytest.raises(ValueError, match="q and eta apply only to synthetic"):
        annotate(ds0, spec, q=0.1, eta=0.1, cache_dir=tmp_path)
    digits = load_dataset(DatasetSpec(name="digits", subsample=50, test_subsample=20))
    with pytest.raises(ValueError, match="ships no candidate sets"):
        annotate(digits, spec, cache_dir=tmp_path)


def test_sweep_inputs_keep_each_split_apart(fake):
    from orchestrator.sweep import check_inputs

    root, _ = fake
    g = parse_grid(grid([{"name": "lost", "root": str(root), "split": k} for k in (0, 3)]))
    loaded = check_inputs(g)
    assert [loaded[d].identity["split"]["predefined"] for d in g.datasets] == [0, 3]


# ------------------------------------------------------------------------------------ tiny run


@needs_files
def test_tiny_run_on_lost_learns(tmp_path, one_thread):
    from trainables.loop import prepare_data, run_trial

    g = parse_grid(
        grid(
            [{"name": "lost", "root": str(PLL_ROOT), "split": 1}],
            storage=str(tmp_path),
            training={"epochs": 4, "batch_size": 128, "lr": 0.01, "scheduler": "constant", "val_fraction": 0.05},
            methods=[{"name": "cc", "params": {"augment": False}}],
        )
    )
    study = expand(g)[0]
    ds = load_dataset(study.cell.dataset)
    ann = annotate(ds, study.cell.annotator, cache_dir=tmp_path / "annotations")
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp_path / "annotations"), cpus=1, device="cpu")
    td = prepare_data(config, torch.device("cpu"))
    assert torch.equal(td.data.cand.bool().cpu(), torch.as_tensor(ds.train_cand[td.split.train]))
    assert len(td.val_x) == round(0.05 * len(ds.train_y))
    out: list[dict] = []
    run_trial(config, lambda metrics, save: out.append(dict(metrics)))
    assert len(out) == 4 and all(np.isfinite(m["train/loss"]) for m in out if "train/loss" in m)
    # Chance is 1/16 and the largest class is 15% of the test part; CC is well past both in 4 epochs.
    assert out[-1]["test/acc"] > 0.45 and out[-1]["pl/acc"] > 0.6
    assert 0.0 < out[-1]["val/covering_rate"] <= 1.0
