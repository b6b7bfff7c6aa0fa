"""Data sets: registry, digits split and subsets, Fashion-MNIST idx files, clear missing-file errors."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DatasetSpec
from trainables.data.datasets import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    DatasetNotFoundError,
    load_dataset,
    read_idx,
    stratified_subset,
)


def test_registry_matches_the_paper_and_torchvision():
    from torchvision.datasets import FashionMNIST

    assert set(DATASETS) == {"digits", "fashion_mnist", "cifar10", "cifar100", "svhn", "lost", "msrcv2", "pll_mat", "image_folder",
                             "eurosat", "gtsrb", "fer2013"}
    assert list(DATASETS["svhn"].class_names) == [
        "number 0", "number 1", "number 2", "number 3", "number 4",
        "number 5", "number 6", "number 7", "number 8", "number 9",
    ]  # fmt: skip  # the paper's appendix A.2
    assert list(DATASETS["fashion_mnist"].class_names) == FashionMNIST.classes
    assert DATASETS["cifar10"].class_names[:3] == ("airplane", "automobile", "bird")
    c100 = DATASETS["cifar100"].class_names
    assert len(c100) == len(set(c100)) == 100
    assert list(c100) == sorted(c100)  # torchvision's (the meta file's) order is alphabetical
    assert {"aquarium_fish", "maple_tree", "worm"} <= set(c100)
    assert not DATASETS["digits"].hflip and not DATASETS["svhn"].hflip
    assert DATASETS["cifar10"].hflip and DATASETS["fashion_mnist"].hflip
    assert DATASETS["digits"].default_backbone == DATASETS["fashion_mnist"].default_backbone == "small_cnn"
    assert {DATASETS[n].default_backbone for n in ("cifar10", "cifar100", "svhn")} == {"preact_resnet18"}
    assert (DATASETS["cifar10"].channels, DATASETS["cifar10"].image_size) == (3, 32)
    assert (DATASETS["fashion_mnist"].channels, DATASETS["fashion_mnist"].image_size) == (1, 28)


def test_import_is_cheap():
    code = (
        "import sys, trainables.data.datasets; "
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits"))


def test_digits_shapes_and_content(digits):
    from sklearn.datasets import load_digits

    assert digits.train_x.shape == (1348, 1, 8, 8) and digits.test_x.shape == (449, 1, 8, 8)  # 1797, 25% test
    assert digits.train_x.dtype == np.uint8 and digits.train_y.dtype == np.int64 and digits.test_y.dtype == np.int64
    assert digits.num_classes == 10 and digits.kind == "image" and not digits.hflip
    assert digits.train_x.max() == 255 and digits.train_x.min() == 0
    # Train + test is exactly sklearn's set, values 0..16 mapped to 0..255.
    ref = load_digits()
    ref_x = np.rint(ref.images * 255 / 16).astype(np.uint8)
    ours = sorted(
        x.tobytes() + bytes([y])
        for x, y in zip(
            np.concatenate([digits.train_x, digits.test_x])[:, 0], np.concatenate([digits.train_y, digits.test_y])
        )
    )
    theirs = sorted(x.tobytes() + bytes([y]) for x, y in zip(ref_x, ref.target))
    assert ours == theirs
    # Normalisation statistics of the training images, in [0, 1] units.
    assert digits.mean[0] == pytest.approx((digits.train_x / 255.0).mean())
    assert digits.std[0] == pytest.approx((digits.train_x / 255.0).std(), rel=1e-6)


def test_digits_split_is_stratified_and_seeded(digits):
    counts_all = np.bincount(np.concatenate([digits.train_y, digits.test_y]))
    assert np.all(np.abs(np.bincount(digits.test_y) - 0.25 * counts_all) <= 1)
    again = load_dataset(DatasetSpec(name="digits"))
    assert np.array_equal(again.train_x, digits.train_x) and np.array_equal(again.test_y, digits.test_y)
    assert again.identity == digits.identity
    other = load_dataset(DatasetSpec(name="digits", subsample_seed=1))
    assert not np.array_equal(other.test_x, digits.test_x)
    assert other.identity["sha256"] != digits.identity["sha256"]


def test_subsample_is_stratified_seeded_and_a_subset(digits):
    spec = DatasetSpec(name="digits", subsample=200, test_subsample=50)
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.train_x.shape == (200, 1, 8, 8) and a.test_x.shape == (50, 1, 8, 8)
    assert np.array_equal(a.train_x, b.train_x) and a.identity == b.identity
    share = np.bincount(digits.train_y, minlength=10) / len(digits.train_y)
    assert np.all(np.abs(np.bincount(a.train_y, minlength=10) - 200 * share) < 1)
    full = {x.tobytes() for x in digits.train_x}
    assert all(x.tobytes() in full for x in a.train_x)
    assert a.identity["subsample"] == 200 and a.identity["sha256"] != digits.identity["sha256"]
    c = load_dataset(DatasetSpec(name="digits", subsample=200, test_subsample=50, subsample_seed=0))
    assert np.array_equal(c.train_x, a.train_x)  # the default seed is 0
    # Another seed changes the subset (and the digits split it is drawn from).
    d = load_dataset(DatasetSpec(name="digits", subsample=200, subsample_seed=3))
    assert not np.array_equal(d.train_x, a.train_x)


def test_subsample_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match=r"subsample=5000 exceeds the 1348 available training images"):
        load_dataset(DatasetSpec(name="digits", subsample=5000))


def test_stratified_subset_counts():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rng = np.random.default_rng(0)
    idx = stratified_subset(labels, 10, rng)
    assert np.array_equal(np.bincount(labels[idx]), [5, 3, 2])
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    # 4 of 3 equal classes: one remainder slot, to the lowest class id.
    idx = stratified_subset(np.repeat([0, 1, 2], 3), 4, rng)
    assert np.array_equal(np.bincount(np.repeat([0, 1, 2], 3)[idx]), [2, 1, 1])
    with pytest.raises(ValueError):
        stratified_subset(labels, 101, rng)


# ------------------------------------------------------------------------------ fashion_mnist


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An idx file written from the format's description: 0, 0, type 0x08 (ubyte), ndim, sizes."""
    data = (
        bytes([0, 0, 0x08, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )
    path.write_bytes(gzip.compress(data) if compress else data)


def _fake_fashion(folder: Path, compress: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.tile(np.arange(10, dtype=np.uint8), 2),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.permutation(10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        _write_idx(folder / (stem + (".gz" if compress else "")), a, compress)
    return arrays


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_fashion_mnist_from_idx_files(tmp_path, layout):
    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    arrays = _fake_fashion(folder, compress=layout == "debian")
    ds = load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path)))
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    assert np.array_equal(ds.train_x[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_x[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.train_y, arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert ds.class_names[0] == "T-shirt/top" and ds.hflip


def test_fashion_mnist_identity_follows_content(tmp_path):
    _fake_fashion(tmp_path / "a", compress=True, seed=0)
    _fake_fashion(tmp_path / "b", compress=True, seed=1)
    a = load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path / "a")))
    b = load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path / "b")))
    assert a.identity["sha256"] != b.identity["sha256"]


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    _write_idx(tmp_path / "ok", np.zeros((3, 2, 2), np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "png")


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "download: true" in msg


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package():
    ds = load_dataset(DatasetSpec(name="fashion_mnist"))  # default root: the Debian directory
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.train_y), [6000] * 10)  # Fashion-MNIST is balanced
    assert np.array_equal(np.bincount(ds.test_y), [1000] * 10)
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)  # the commonly quoted statistics
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-3)


# ---------------------------------------------------------------------- torchvision data sets


@pytest.mark.parametrize(
    "name, expected",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")],
)
def test_missing_torchvision_files_give_a_clear_error(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(DatasetSpec(name=name, root=str(tmp_path)))
    assert isinstance(err.value, DatasetNotFoundError)
    msg = str(err.value)
    assert msg.startswith(f"{name}:")
    assert str(tmp_path) in msg and expected in msg
    assert "root:" in msg and "download: true" in msg


def test_channel_stats_leave_a_constant_channel_unscaled():
    from trainables.data.datasets import channel_stats

    x = np.zeros((4, 2, 3, 3), dtype=np.uint8)
    x[:, 0] = np.arange(4, dtype=np.uint8)[:, None, None] * 60  # varies: 0, 60, 120, 180
    x[:, 1] = 100  # constant: its std would be 0
    mean, std = channel_stats(x)
    assert mean == pytest.approx((90 / 255, 100 / 255)) and std[0] == pytest.approx(np.std([0, 60, 120, 180]) / 255)
    assert std[1] == 1.0
