"""Any partial-label ``.mat`` file (``pll_mat``) and data-set ``label``s (one data set twice as two columns).

The files are written here with scipy in the standard layout (and its variants: no splits, class
names in the file, class-major matrices); the shipped Lost file is read both ways when present.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from orchestrator.annotation.stage import annotate
from orchestrator.config import GivenAnnotatorSpec, GridError, parse_grid
from orchestrator.plan import expand
from orchestrator.runs import cell_tags
from trainables.data.datasets import DatasetNotFoundError, load_dataset
from trainables.data.spec import DatasetSpec

PLL_ROOT = Path(os.environ.get("COREG_PLL_ROOT", "/work/shared/data/pll"))


def write_mat(path: Path, n: int = 50, c: int = 5, d: int = 7, splits: int = 0, seed: int = 0, **extra) -> dict:
    """A partial-label file; column 0 of the features is the 0-based sample index."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    x = rng.normal(size=(n, d))
    x[:, 0] = np.arange(n)
    cand = rng.random((n, c)) < 0.3
    cand[np.arange(n), y] = True
    content = {"features": x, "p_labels": cand.astype(float), "logitlabels": np.eye(c)[y], **extra}
    if splits:
        folds = np.array_split(rng.permutation(n), splits)
        content["tr"] = np.empty((1, splits), dtype=object)
        content["te"] = np.empty((1, splits), dtype=object)
        for k, fold in enumerate(folds):
            content["te"][0, k] = (np.sort(fold) + 1)[None, :]
            content["tr"][0, k] = (np.setdiff1d(np.arange(n), fold) + 1)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, content)
    return {"x": x, "y": y, "cand": cand}


def ids(ds) -> tuple[np.ndarray, np.ndarray]:
    return ds.train_x[:, 0].astype(int), ds.test_x[:, 0].astype(int)


def test_predefined_splits_are_read(tmp_path):
    truth = write_mat(tmp_path / "birdsong.mat", splits=3)
    for k in range(3):
        ds = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "birdsong.mat"), split=k))
        train, test = ids(ds)
        assert not set(train) & set(test) and len(train) + len(test) == 50
        assert np.array_equal(ds.train_y, truth["y"][train]) and np.array_equal(ds.test_y, truth["y"][test])
        assert np.array_equal(ds.train_cand, truth["cand"][train])
        assert ds.identity["split"] == {"predefined": k, "of": 3}
    ds = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "birdsong.mat")))
    assert ds.identity["split"] == {"predefined": 0, "of": 3}  # split 0 when the file has splits
    assert ds.class_names == [f"class {i}" for i in range(5)] and ds.kind == "features" and ds.num_classes == 5
    with pytest.raises(ValueError, match="split 3 asked but .* has 3 splits"):
        load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "birdsong.mat"), split=3))


def test_without_splits_a_seeded_stratified_80_20_split(tmp_path):
    truth = write_mat(tmp_path / "soccer.mat", n=100, c=4)
    a = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "soccer.mat")))
    again = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "soccer.mat")))
    other = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "soccer.mat"), subsample_seed=1))
    train, test = ids(a)
    assert len(test) == 20 and len(train) == 80 and not set(train) & set(test)
    assert np.bincount(a.test_y).tolist() == [5, 5, 5, 5]  # stratified: 25 per class, 5 of each held out
    assert np.array_equal(ids(again)[1], test) and not np.array_equal(ids(other)[1], test)
    assert np.array_equal(a.train_cand, truth["cand"][train])
    assert a.identity["split"] == {"test_fraction": 0.2, "seed": 0, "stratified": True}
    with pytest.raises(ValueError, match="split 1 asked but .* has no predefined splits"):
        load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "soccer.mat"), split=1))


def test_class_names_from_the_file_the_grid_or_a_names_file(tmp_path):
    names = np.array(["sparrow", "crow", "owl", "wren", "gull"], dtype=object)
    write_mat(tmp_path / "birds.mat", class_names=names)
    path = str(tmp_path / "birds.mat")
    assert load_dataset(DatasetSpec(name="pll_mat", path=path)).class_names == list(names)
    given = ("a", "b", "c", "d", "e")
    assert load_dataset(DatasetSpec(name="pll_mat", path=path, class_names=given)).class_names == list(given)
    (tmp_path / "names.txt").write_text("one\ntwo\nthree\n\nfour\nfive\n", encoding="utf-8")
    ds = load_dataset(DatasetSpec(name="pll_mat", path=path, class_names=str(tmp_path / "names.txt")))
    assert ds.class_names == ["one", "two", "three", "four", "five"]  # blank lines skipped
    with pytest.raises(ValueError, match="class_names gives 2 names but the data set has 5 classes"):
        load_dataset(DatasetSpec(name="pll_mat", path=path, class_names=("a", "b")))


def test_class_major_matrices_are_read_transposed(tmp_path):
    from scipy.io import loadmat, savemat

    truth = write_mat(tmp_path / "t.mat")
    mat = {k: v for k, v in loadmat(tmp_path / "t.mat").items() if not k.startswith("__")}
    savemat(tmp_path / "t.mat", {**mat, "p_labels": mat["p_labels"].T, "logitlabels": mat["logitlabels"].T})
    ds = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "t.mat")))
    train, _ = ids(ds)
    assert np.array_equal(ds.train_cand, truth["cand"][train]) and np.array_equal(ds.train_y, truth["y"][train])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"drop": "p_labels"}, "lacks the key(s) ['p_labels']"),
        ({"logitlabels": np.ones((50, 5))}, "logitlabels is not one-hot"),
        ({"p_labels": np.zeros((50, 5))}, "50 samples have an empty candidate set"),
        ({"logitlabels": np.eye(5)[np.arange(40) % 5]}, "logitlabels is (40, 5) but features has 50 rows"),
        ({"tr": np.ones((1, 1))}, "has only one of `tr` / `te`"),
    ],
)
def test_malformed_files_are_refused_with_the_layout(tmp_path, change, expected):
    from scipy.io import loadmat, savemat

    write_mat(tmp_path / "bad.mat")
    mat = {k: v for k, v in loadmat(tmp_path / "bad.mat").items() if not k.startswith("__")}
    mat.pop(change.pop("drop", None), None)
    savemat(tmp_path / "bad.mat", {**mat, **change})
    with pytest.raises(ValueError) as err:
        load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "bad.mat")))
    assert expected in str(err.value)


def test_missing_or_unreadable_file_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"pll_mat: .*nowhere\.mat is not a file\. Expected a MATLAB v5 \.mat file with `features`"):
        load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "nowhere.mat")))
    (tmp_path / "text.mat").write_text("hello")
    with pytest.raises(DatasetNotFoundError, match="text.mat is not a readable MATLAB v5 file"):
        load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "text.mat")))


@pytest.mark.skipif(not (PLL_ROOT / "lost.mat").is_file(), reason=f"lost.mat not in {PLL_ROOT}")
def test_shipped_lost_file_reads_the_same_by_path_and_by_name():
    by_name = load_dataset(DatasetSpec(name="lost", root=str(PLL_ROOT), split=2))
    by_path = load_dataset(DatasetSpec(name="pll_mat", path=str(PLL_ROOT / "lost.mat"), split=2))
    for key in ("train_x", "train_y", "test_x", "test_y", "train_cand"):
        assert np.array_equal(getattr(by_name, key), getattr(by_path, key)), key
    assert by_path.num_classes == 16 and by_path.train_x.shape[1] == 108
    assert by_path.identity["sha256"] == by_name.identity["sha256"]  # same content: the same annotation key


# ----------------------------------------------------------------------------- grid and labels


def grid(datasets, annotators=({"kind": "given"},), **extra) -> dict:
    return {"experiment": "t", "datasets": list(datasets), "annotators": list(annotators), "methods": [{"name": "cc"}], **extra}


def refusal(raw: dict) -> str:
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    return str(err.value)


def test_one_data_set_twice_with_labels_makes_two_columns():
    g = parse_grid(
        grid(
            [{"name": "digits", "label": "digits-100", "subsample": 100}, {"name": "digits", "label": "digits-200", "subsample": 200}],
            [{"kind": "synthetic"}],
            grid={"q": [0.3], "eta": [0.1]},
        )
    )
    studies = expand(g)
    assert len({s.study_id for s in studies}) == 2
    assert [cell_tags(s.cell.spec())["dataset"] for s in studies] == ["digits-100", "digits-200"]
    assert [s.cell.label(with_seed=False) for s in studies] == ["digits-100 synthetic q=0.3 eta=0.1", "digits-200 synthetic q=0.3 eta=0.1"]
    # The label names a column; it is not part of the content: the annotation key is the same data's.
    assert "duplicate name(s) ['digits']" in refusal(grid([{"name": "digits"}, {"name": "digits", "subsample": 100}], [{"kind": "synthetic"}], grid={"q": [0.3], "eta": [0.1]}))


def test_pll_mat_columns_default_to_the_file_name(tmp_path):
    g = parse_grid(grid([{"name": "pll_mat", "path": str(tmp_path / "birdsong.mat")}, {"name": "pll_mat", "path": str(tmp_path / "yahoo.mat")}]))
    assert [d.display for d in g.datasets] == ["birdsong", "yahoo"]
    assert isinstance(g.annotators[0], GivenAnnotatorSpec)  # pll_mat ships its candidate sets


def test_unset_new_options_leave_the_dump_as_before():
    """Cell, study and sweep signatures of grids written before these options exist do not change
    (checked once against the code before them: the default, real_pll and synthetic_table3 grids
    give the same sweep signature and study ids)."""
    dump = DatasetSpec(name="digits").model_dump()
    assert set(dump) == {"name", "root", "download", "subsample", "test_subsample", "subsample_seed", "split", "feature_scaling"}
    labelled = DatasetSpec(name="digits", label="d")
    assert labelled.model_dump()["label"] == "d" and DatasetSpec(**labelled.model_dump()) == labelled
    from orchestrator.config import GridAxes, SyntheticAnnotatorSpec

    assert "imbalance_ratio" not in GridAxes().model_dump() and GridAxes(imbalance_ratio=[1.0]).model_dump()["imbalance_ratio"] == [1.0]
    assert set(SyntheticAnnotatorSpec(kind="synthetic").model_dump()) == {"kind", "name", "generator"}


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"name": "pll_mat"}, "path: required by pll_mat (a partial-label .mat file)"),
        ({"name": "digits", "path": "/x.mat"}, "path: applies only to pll_mat and image_folder, not to digits"),
        ({"name": "digits", "class_names": ["a"]}, "class_names: applies only to pll_mat and image_folder"),
        ({"name": "pll_mat", "path": "/x.mat", "class_names": ["a", "a"]}, "class_names: a non-empty list of distinct names"),
        ({"name": "pll_mat", "path": "/x.mat", "image_size": 32}, "image_size: applies only to image_folder"),
        ({"name": "digits", "label": ""}, "datasets[0].label: String should have at least 1 character"),
        ({"name": "pll_mat", "path": 3}, "datasets[0].path: Input should be a valid string"),
        ({"name": "pll_mat", "path": "/x.mat", "feature_scaling": "none"}, "datasets[0].feature_scaling: Input should be 'per_feature' or 'global'"),
    ],
)
def test_dataset_entry_refusals(entry, expected):
    assert expected in refusal(grid([entry]))


def test_given_annotation_of_a_pll_mat_file(tmp_path):
    write_mat(tmp_path / "b.mat", splits=2)
    ds = load_dataset(DatasetSpec(name="pll_mat", path=str(tmp_path / "b.mat"), split=1))
    ann = annotate(ds, GivenAnnotatorSpec(kind="given"), cache_dir=tmp_path / "cache")
    assert np.array_equal(ann.cand_train, ds.train_cand) and ann.stats["partial_acc"] == 1.0


def test_dry_run_refuses_a_missing_file_before_ray(tmp_path, capsys):
    from orchestrator.sweep import main

    path = tmp_path / "grid.yaml"
    path.write_text(
        f"experiment: t\nstorage: {tmp_path / 'results'}\ndatasets:\n- {{name: pll_mat, path: {tmp_path / 'missing.mat'}}}\n"
        "annotators:\n- {kind: given}\nmethods:\n- {name: cc}\n"
    )
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"datasets[0] (pll_mat): pll_mat: {tmp_path / 'missing.mat'} is not a file. Expected a MATLAB v5 .mat file" in err
    assert "Traceback" not in err
