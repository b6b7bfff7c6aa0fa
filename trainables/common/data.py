"""Image data sets as plain uint8 arrays, with a content identity for cache keys.

``DATASETS`` describes every known data set without touching the disk (``orchestrator.config``
imports it to validate grid files, so this module imports only numpy and the standard library;
torchvision and scikit-learn are imported inside the loaders). ``load_dataset(spec)`` returns a
:class:`Dataset`: train/test images ``(N, C, H, W)`` uint8 and int64 labels, the class descriptions
the annotator prompts with, per-channel normalisation statistics and an ``identity`` dict that
pins the content (used in annotation and run cache keys).

Where the files come from:

- ``digits``: scikit-learn's bundled 8x8 digits (always available). It has no official split:
  a seeded class-stratified 25% test split is drawn (seed ``subsample_seed``).
- ``fashion_mnist``: the four original idx files (``train-images-idx3-ubyte[.gz]`` ...), parsed
  here with numpy, found either directly in ``root`` (Debian's ``dataset-fashion-mnist`` package
  installs them in ``/usr/share/datasets/fashion-mnist``, the default root when it exists) or in
  torchvision's layout ``root/FashionMNIST/raw``.
- ``cifar10``, ``cifar100``, ``svhn``: torchvision's readers and layout (``download: true`` lets
  torchvision fetch the files; tests never do).

The default root of the torchvision data sets is ``$COREG_DATA_ROOT`` or
``~/.cache/coreg-orchestrator/datasets``.

Class descriptions follow the Co-Reg paper: torchvision class names for CIFAR-10/100 and
Fashion-MNIST (underscores kept, e.g. ``aquarium_fish``, as the reference code prompts with
``dataset.classes`` unchanged) and the paper's appendix A.2 ``"number 0"`` ... ``"number 9"`` for
SVHN. ``digits`` is not in the paper; it reuses the SVHN descriptions.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from orchestrator.config import DatasetSpec

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four idx ``.gz`` files."""

DIGITS_TEST_FRACTION = 0.25


def default_data_root() -> Path:
    """Root of the torchvision-layout data sets when grid.yaml gives none."""
    return Path(os.environ.get("COREG_DATA_ROOT", "~/.cache/coreg-orchestrator/datasets")).expanduser()


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are missing (or unreadable) and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a data set before loading it (cheap; used by grid validation)."""

    name: str
    class_names: tuple[str, ...]
    """Descriptions the annotator prompts with, in label order."""
    channels: int
    image_size: int
    hflip: bool
    """Whether a horizontal flip preserves the label (no for digits: a flipped 2 is not a 2)."""
    default_backbone: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


NUMBERS = tuple(f"number {d}" for d in range(10))

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits", NUMBERS, channels=1, image_size=8, hflip=False, default_backbone="small_cnn"),
        DatasetInfo(
            "fashion_mnist", FASHION_MNIST_CLASSES, channels=1, image_size=28, hflip=True, default_backbone="small_cnn"
        ),
        DatasetInfo(
            "cifar10", CIFAR10_CLASSES, channels=3, image_size=32, hflip=True, default_backbone="preact_resnet18"
        ),
        DatasetInfo(
            "cifar100", CIFAR100_CLASSES, channels=3, image_size=32, hflip=True, default_backbone="preact_resnet18"
        ),
        DatasetInfo("svhn", NUMBERS, channels=3, image_size=32, hflip=False, default_backbone="preact_resnet18"),
    )
}


@dataclass
class Dataset:
    """A loaded image data set. Labels are ground truth: only the annotator's statistics and the
    loop's reported metrics may read them."""

    name: str
    train_x: np.ndarray  # (N, C, H, W) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray  # (M, C, H, W) uint8
    test_y: np.ndarray  # (M,) int64
    class_names: list[str]
    mean: tuple[float, ...]
    """Per-channel mean of the full training split, in [0, 1] units."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the full training split, in [0, 1] units."""
    hflip: bool
    default_backbone: str
    identity: dict[str, Any] = field(default_factory=dict)
    """Everything that determines the content (name, split, subsets, array fingerprint)."""
    kind: str = "image"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------------
# Seeded, class-stratified subsets


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n`` samples whose class proportions match ``labels`` as closely as possible.

    Per-class counts are the largest-remainder rounding of ``n * count_c / N`` (ties go to the
    lower class id), so the result is exact and deterministic given ``rng``.
    """
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"cannot take a subset of {n} samples from {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder = n - take.sum()
    order = np.lexsort((classes, -(quota - take)))  # largest fractional part first, then class id
    take[order[:remainder]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take) if k > 0]
    return np.sort(np.concatenate(chosen))


def _subset_rng(seed: int, purpose: int) -> np.random.Generator:
    """Independent streams for the digits split (0), train subset (1) and test subset (2)."""
    return np.random.default_rng([seed, purpose])


# --------------------------------------------------------------------------------------------
# Loaders: each returns (train_x, train_y, test_x, test_y, source description)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


def _load_digits(spec: DatasetSpec) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block; spread them over the uint8 range.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    test[stratified_subset(y, round(DIGITS_TEST_FRACTION * len(y)), _subset_rng(spec.subsample_seed, 0))] = True
    split = {"test_fraction": DIGITS_TEST_FRACTION, "seed": spec.subsample_seed, "stratified": True}
    return x[~test], y[~test], x[test], y[test], {"source": "sklearn.datasets.load_digits", "split": split}


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format), gzipped or not.

    Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32
    per dimension; the data follow in C order.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_files(root: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST idx files in ``root`` or ``root/FashionMNIST/raw`` (plain or .gz)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in IDX_FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(IDX_FILES):
            return found
    return None


def _missing(
    name: str, root: Path, expected: str, layout: str, cause: BaseException | None = None
) -> DatasetNotFoundError:
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return DatasetNotFoundError(
        f"{name}: data set files not found or unreadable under {root}{why}. Expected {expected}. "
        f"Provide them by setting the dataset's `root:` in grid.yaml to a directory with {layout}, "
        f"or set `download: true` on a machine with internet access."
    )


def _load_fashion_mnist(spec: DatasetSpec) -> Arrays:
    if spec.root is not None:
        root = Path(spec.root).expanduser()
    elif _find_idx_files(DEBIAN_FASHION_MNIST) is not None:
        root = DEBIAN_FASHION_MNIST
    else:
        root = default_data_root()
    files = _find_idx_files(root)
    if files is None and spec.download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as err:  # network, permissions, corrupt archive: all mean "no files"
            raise _missing("fashion_mnist", root, _FASHION_EXPECTED, _FASHION_LAYOUT, err) from err
        files = _find_idx_files(root)
    if files is None:
        raise _missing("fashion_mnist", root, _FASHION_EXPECTED, _FASHION_LAYOUT)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for key in ("train_x", "test_x"):
        if arrays[key].ndim != 3 or arrays[key].dtype != np.uint8:
            raise ValueError(
                f"fashion_mnist: {files[key]} holds {arrays[key].dtype} {arrays[key].shape}, expected uint8 (N, 28, 28)"
            )
    return (
        arrays["train_x"][:, None],
        arrays["train_y"].astype(np.int64),
        arrays["test_x"][:, None],
        arrays["test_y"].astype(np.int64),
        {"source": "idx", "files": {k: str(p) for k, p in files.items()}, "split": "official"},
    )


_FASHION_EXPECTED = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
_FASHION_LAYOUT = (
    "those four files (Debian: `apt-get install dataset-fashion-mnist` puts them in "
    f"{DEBIAN_FASHION_MNIST}) or torchvision's layout <root>/FashionMNIST/raw/"
)


def _torchvision_root(spec: DatasetSpec) -> Path:
    return Path(spec.root).expanduser() if spec.root is not None else default_data_root()


def _call_torchvision(name: str, root: Path, expected: str, layout: str, make: Callable[[], Any]) -> Any:
    """Run a torchvision constructor, turning its generic "not found or corrupted" into ours."""
    try:
        return make()
    except Exception as err:  # RuntimeError (missing / md5 mismatch), URLError offline, OSError...
        raise _missing(name, root, expected, layout, err) from err


def _load_cifar(spec: DatasetSpec) -> Arrays:
    from torchvision import datasets

    root = _torchvision_root(spec)
    if spec.name == "cifar10":
        cls, folder, files = datasets.CIFAR10, "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"
    else:
        cls, folder, files = datasets.CIFAR100, "cifar-100-python", "train, test, meta"
    expected = f"{root / folder}/{{{files}}}"
    layout = f"torchvision's layout (<root>/{folder}/...)"
    train = _call_torchvision(
        spec.name, root, expected, layout, lambda: cls(str(root), train=True, download=spec.download)
    )
    test = _call_torchvision(
        spec.name, root, expected, layout, lambda: cls(str(root), train=False, download=spec.download)
    )
    if tuple(train.classes) != DATASETS[spec.name].class_names:
        raise ValueError(f"{spec.name}: the class list in {root / folder} differs from the known one: {train.classes}")
    return (
        np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        np.asarray(train.targets, dtype=np.int64),
        np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),
        np.asarray(test.targets, dtype=np.int64),
        {"source": f"torchvision.datasets.{cls.__name__}", "root": str(root), "split": "official"},
    )


def _load_svhn(spec: DatasetSpec) -> Arrays:
    from torchvision.datasets import SVHN

    root = _torchvision_root(spec)
    expected = f"{root}/{{train_32x32.mat, test_32x32.mat}}"
    layout = "torchvision's layout (the two .mat files directly in <root>)"
    # torchvision maps the .mat files' label 10 to digit 0 and transposes to (N, 3, 32, 32).
    train = _call_torchvision(
        "svhn", root, expected, layout, lambda: SVHN(str(root), split="train", download=spec.download)
    )
    test = _call_torchvision(
        "svhn", root, expected, layout, lambda: SVHN(str(root), split="test", download=spec.download)
    )
    return (
        np.ascontiguousarray(train.data),
        train.labels.astype(np.int64),
        np.ascontiguousarray(test.data),
        test.labels.astype(np.int64),
        {"source": "torchvision.datasets.SVHN", "root": str(root), "split": "official (extra not used)"},
    )


_LOADERS: dict[str, Callable[[DatasetSpec], Arrays]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
}


# --------------------------------------------------------------------------------------------


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) in [0, 1] units.

    Accumulates sums in float64 chunk by chunk so CIFAR-sized arrays never get a float copy.
    """
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m / 255.0) for m in mean), tuple(float(s / 255.0) for s in std)


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the dtype, shape and bytes of each array."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Load a data set described by a grid.yaml ``datasets:`` entry.

    Raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) naming the directory looked at,
    the expected files and how to provide them, and ``ValueError`` for impossible subset sizes.
    """
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; allowed: {', '.join(sorted(DATASETS))}")
    info = DATASETS[spec.name]
    train_x, train_y, test_x, test_y, source = _LOADERS[spec.name](spec)
    expected_shape = (info.channels, info.image_size, info.image_size)
    for what, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != expected_shape or len(x) != len(y):
            raise ValueError(
                f"{spec.name}: {what} images are {x.dtype} {x.shape} with {len(y)} labels; "
                f"expected uint8 (N, {expected_shape})"
            )
        if y.min() < 0 or y.max() >= info.num_classes:
            raise ValueError(
                f"{spec.name}: {what} labels span [{y.min()}, {y.max()}], expected [0, {info.num_classes - 1}]"
            )
    mean, std = channel_stats(train_x)

    for what, n, purpose in (("subsample", spec.subsample, 1), ("test_subsample", spec.test_subsample, 2)):
        if n is None:
            continue
        x, y = (train_x, train_y) if purpose == 1 else (test_x, test_y)
        if n > len(y):
            raise ValueError(
                f"{spec.name}: {what}={n} exceeds the {len(y)} available "
                f"{'training' if purpose == 1 else 'test'} images"
            )
        keep = stratified_subset(y, n, _subset_rng(spec.subsample_seed, purpose))
        if purpose == 1:
            train_x, train_y = train_x[keep], train_y[keep]
        else:
            test_x, test_y = test_x[keep], test_y[keep]

    identity: dict[str, Any] = {
        "name": spec.name,
        "split": source["split"],
        "subsample": spec.subsample,
        "test_subsample": spec.test_subsample,
        "num_train": int(len(train_y)),
        "num_test": int(len(test_y)),
        "sha256": fingerprint(train_x, train_y, test_x, test_y),
    }
    if spec.subsample is not None or spec.test_subsample is not None:
        identity["subsample_seed"] = spec.subsample_seed  # the digits split carries its own seed
    return Dataset(
        name=spec.name,
        train_x=np.ascontiguousarray(train_x),
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        class_names=list(info.class_names),
        mean=mean,
        std=std,
        hflip=info.hflip,
        default_backbone=info.default_backbone,
        identity=identity,
    )
