"""Data sets as plain arrays (uint8 images or float features), with a content identity for cache keys.

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
- ``eurosat``, ``gtsrb``, ``fer2013``: the papers' other columns, 64x64 (FER2013: 1 channel), in
  torchvision's layouts (``trainables/data/vision.py``; FER2013 from its Kaggle CSV).
- ``lost``, ``msrcv2``: the classic real-world partial-label benchmarks (Cour et al. 2011; Liu and
  Dietterich 2012) as MATLAB v5 files ``lost.mat`` / ``MSRCv2.mat`` (the redistribution in
  github.com/agapiR/partial-label-learning, ``data/realworld/``), found in ``root`` or
  ``root/pll``. Keys: ``features`` (N x d float), ``p_labels`` (N x C shipped candidate sets),
  ``logitlabels`` (one-hot truth, for metrics only), ``tr`` / ``te`` (1 x 5 cells of predefined
  train/test splits, 1-based). ``DatasetSpec.split`` (0..4) picks the split. These are *feature*
  data sets (``kind="features"``): ``train_x`` holds the raw float32 features, ``mean`` / ``std``
  the per-dimension statistics of the split's training part (the feature views standardise with
  them, so test features are standardised with training statistics only; ``DatasetSpec.
  feature_scaling`` chooses per-dimension z-scores or one shared scale), and ``train_cand`` the
  shipped candidate sets of the training part (the ``given`` annotator returns them). The files
  carry no class names: the classes are called ``"class 0"`` ...
- ``pll_mat``: any partial-label ``.mat`` file in the same layout, named by ``DatasetSpec.path``
  (``trainables/data/pll_mat.py``: optional splits, else a seeded 80/20 split; optional class names).
- ``image_folder``: a user's own images, one subfolder per class or a flat unlabeled folder with
  ``class_names`` (``trainables/data/image_folder.py``: resized, decoded in parallel, cached on disk).
  A flat folder gives ``Dataset.labeled = False``.

``imbalance_ratio`` makes any labeled training part long-tailed (:func:`long_tailed_counts`).

The default root of the torchvision and partial-label data sets is ``$COREG_DATA_ROOT`` or
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

from trainables.data.vision import EUROSAT_CLASSES, FER2013_CLASSES, GTSRB_CLASSES

if TYPE_CHECKING:
    from trainables.data.spec import DatasetSpec

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
    kind: str = "image"
    """``image`` (uint8 (N, C, H, W)) or ``features`` (float32 (N, feature_dim))."""
    feature_dim: int = 0
    """Width of a feature vector (feature data sets only)."""
    splits: int = 0
    """Number of predefined train/test splits shipped with the data (0: none, ``split`` is refused;
    -1: as many as the user's file holds, checked when it is read)."""
    file: str | None = None
    """File name of a partial-label ``.mat`` data set."""
    from_path: bool = False
    """Read from the user's files named by ``DatasetSpec.path`` (``pll_mat``, ``image_folder``): the
    classes, sizes (and splits) are known only once the files are read; ``class_names`` is empty."""
    ships_candidates: bool = False
    """Candidate sets come with the files although no ``file`` is named (``pll_mat``)."""
    bundled: bool = False
    """Installed with a dependency (digits, with scikit-learn): there are no files to find."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_candidates(self) -> bool:
        """Whether the data set ships its own candidate sets (what the ``given`` annotator uses)."""
        return self.file is not None or self.ships_candidates


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


def _generic_classes(n: int) -> tuple[str, ...]:
    """The partial-label .mat files carry no class names."""
    return tuple(f"class {i}" for i in range(n))


def _pll(name: str, file: str, num_classes: int, feature_dim: int) -> DatasetInfo:
    return DatasetInfo(
        name, _generic_classes(num_classes), channels=0, image_size=0, hflip=False, default_backbone="mlp",
        kind="features", feature_dim=feature_dim, splits=5, file=file,
    )  # fmt: skip

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits", NUMBERS, channels=1, image_size=8, hflip=False, default_backbone="small_cnn", bundled=True
        ),
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
        DatasetInfo("eurosat", EUROSAT_CLASSES, channels=3, image_size=64, hflip=True, default_backbone="preact_resnet18"),
        DatasetInfo("gtsrb", GTSRB_CLASSES, channels=3, image_size=64, hflip=False, default_backbone="preact_resnet18"),
        DatasetInfo("fer2013", FER2013_CLASSES, channels=1, image_size=64, hflip=True, default_backbone="preact_resnet18"),
        _pll("lost", "lost.mat", num_classes=16, feature_dim=108),
        _pll("msrcv2", "MSRCv2.mat", num_classes=23, feature_dim=48),
        DatasetInfo(
            "pll_mat", (), channels=0, image_size=0, hflip=False, default_backbone="mlp", kind="features",
            splits=-1, from_path=True, ships_candidates=True,
        ),
        DatasetInfo(
            "image_folder", (), channels=3, image_size=32, hflip=True, default_backbone="preact_resnet18",
            from_path=True,
        ),
    )
}  # fmt: skip

FROM_PATH = tuple(name for name, info in DATASETS.items() if info.from_path)
"""Data sets read from the user's files (``path:`` in grid.yaml)."""


@dataclass
class Dataset:
    """A loaded data set. Labels are ground truth: only the annotator's statistics and the loop's
    reported metrics may read them."""

    name: str
    train_x: np.ndarray  # (N, C, H, W) uint8 images or (N, D) float32 features
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray  # (M, C, H, W) uint8 images or (M, D) float32 features
    test_y: np.ndarray  # (M,) int64
    class_names: list[str]
    mean: tuple[float, ...]
    """Per-channel mean of the full training split, in [0, 1] units (features: per dimension, raw units)."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the full training split, in [0, 1] units (features: per dimension)."""
    hflip: bool
    default_backbone: str
    identity: dict[str, Any] = field(default_factory=dict)
    """Everything that determines the content (name, split, subsets, array fingerprint)."""
    kind: str = "image"
    train_cand: np.ndarray | None = None
    """(N, C) bool candidate sets shipped with the data set (None for the image data sets)."""
    labeled: bool = True
    """False for a flat folder of unlabeled images: ``train_y`` is all -1 (unknown) and there is no
    test set, so no accuracy exists; only label-free metrics and annotation statistics do."""

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


def _load_vision(spec: DatasetSpec) -> Arrays:
    from trainables.data import vision

    return {"eurosat": vision.load_eurosat, "gtsrb": vision.load_gtsrb, "fer2013": vision.load_fer2013}[spec.name](spec)


_LOADERS: dict[str, Callable[[DatasetSpec], Arrays]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
    "eurosat": _load_vision,
    "gtsrb": _load_vision,
    "fer2013": _load_vision,
}


PLL_SOURCE = "github.com/agapiR/partial-label-learning (data/realworld/), originally Min-Ling Zhang's PLL data page"


def _pll_root(spec: DatasetSpec) -> Path:
    return Path(spec.root).expanduser() if spec.root is not None else default_data_root()


def _pll_path(spec: DatasetSpec) -> Path:
    """The ``.mat`` file of a partial-label data set: ``path`` for ``pll_mat``, else the named file
    in ``<root>`` or ``<root>/pll``."""
    from trainables.data.pll_mat import LAYOUT

    if spec.name == "pll_mat":
        path = Path(str(spec.path))
        if not path.is_file():
            raise DatasetNotFoundError(f"pll_mat: {path} is not a file. Expected {LAYOUT}")
        return path
    info = DATASETS[spec.name]
    assert info.file is not None
    root = _pll_root(spec)
    looked = [root / info.file, root / "pll" / info.file]
    path = next((p for p in looked if p.is_file()), None)
    if path is None:
        raise DatasetNotFoundError(
            f"{spec.name}: {info.file} not found (looked for {' and '.join(str(p) for p in looked)}). "
            f"Set the dataset's `root:` in grid.yaml to the directory holding {info.file}, or put it in "
            f"$COREG_DATA_ROOT or $COREG_DATA_ROOT/pll (default {default_data_root()}). "
            f"There is no automatic download; the file is in {PLL_SOURCE}."
        )
    return path


def _load_pll_mat(spec: DatasetSpec) -> tuple[Arrays, np.ndarray, tuple[str, ...]]:
    """The split of a real-world partial-label data set, its shipped candidate sets (training part)
    and its class names."""
    from trainables.data.pll_mat import read_pll_mat

    path = _pll_path(spec)
    a = read_pll_mat(spec.name, path, spec.split, spec.subsample_seed)
    return (a.train_x, a.train_y, a.test_x, a.test_y, {"source": path.name, "split": a.split}), a.train_cand, a.class_names


def _class_names_of(spec: DatasetSpec, found: tuple[str, ...]) -> tuple[str, ...]:
    """The grid's ``class_names`` (a list, or a file with one name per line) if given, else ``found``."""
    names = spec.class_names
    if names is None:
        return found
    if isinstance(names, str):
        path = Path(names)
        try:
            names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetNotFoundError(f"{spec.name}: class_names file {path} is unreadable ({type(err).__name__}: {err}); expected UTF-8 text, one class name per line") from err
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{spec.name}: class_names must be distinct and non-empty, got {list(names)[:10]}")
    if found and len(names) != len(found):
        raise ValueError(f"{spec.name}: class_names gives {len(names)} names but the data set has {len(found)} classes")
    return tuple(names)


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
    std = np.where(std > 1e-3, std, 255.0)  # a constant channel is centred, not divided by zero
    return tuple(float(m / 255.0) for m in mean), tuple(float(s / 255.0) for s in std)


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the dtype, shape and bytes of each array."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        if a.size:  # an empty array (no test set) has no bytes, and memoryview cannot cast it
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def feature_stats(x: np.ndarray, scaling: str = "per_feature") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-dimension mean and scale of features (N, D) for ``DatasetSpec.feature_scaling``.

    ``per_feature``: each dimension's std (a constant dimension gets 1, i.e. is left unscaled).
    ``global``: one scale for every dimension, the root of the mean variance, so the relative
    scales of the dimensions (e.g. PCA components) survive.
    """
    mean = x.astype(np.float64).mean(axis=0)
    var = x.astype(np.float64).var(axis=0)
    if scaling == "per_feature":
        std = np.sqrt(var)
        std[std == 0] = 1.0
    elif scaling == "global":
        std = np.full_like(var, np.sqrt(var.mean()) or 1.0)
    else:
        raise ValueError(f"unknown feature scaling {scaling!r}; allowed: per_feature, global")
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def _check_arrays(
    spec: DatasetSpec, info: DatasetInfo, num_classes: int, what: str, x: np.ndarray, y: np.ndarray, labeled: bool = True
) -> None:
    if info.kind == "features":
        dim = info.feature_dim or (x.shape[1] if x.ndim == 2 else -1)
        ok, expected = x.dtype == np.float32 and x.shape[1:] == (dim,), f"float32 (N, {dim})"
        noun = "features"
    else:
        size = spec.image_size or info.image_size if info.from_path else info.image_size
        shape = ((spec.channels or info.channels) if info.from_path else info.channels, size, size)
        ok, expected = x.dtype == np.uint8 and x.shape[1:] == shape, f"uint8 (N, {shape})"
        noun = "images"
    if not ok or len(x) != len(y):
        raise ValueError(f"{spec.name}: {what} {noun} are {x.dtype} {x.shape} with {len(y)} labels; expected {expected}")
    if len(y) and labeled and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{spec.name}: {what} labels span [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]")


def long_tailed_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Per-class sizes of a long-tailed pool (Cao et al. 2019, CIFAR-10-LT; PartialCLIP's LT sets):
    class c keeps ``floor(max(counts) * ratio^(-c / (C - 1)))``, capped at what it has."""
    c = len(counts)
    profile = ratio ** (-np.arange(c) / max(c - 1, 1))
    return np.minimum(np.floor(counts.max() * profile + 1e-9).astype(np.int64), counts)


def _long_tailed(spec: DatasetSpec, x: np.ndarray, y: np.ndarray, cand: np.ndarray | None, num_classes: int) -> tuple:
    """The seeded long-tailed subset of the training part (``spec.imbalance_ratio``)."""
    if spec.imbalance_ratio is None:
        return x, y, cand
    counts = np.bincount(y, minlength=num_classes)
    take = long_tailed_counts(counts, spec.imbalance_ratio)
    rng = _subset_rng(spec.subsample_seed, 3)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == k), size=n, replace=False) for k, n in enumerate(take)]))
    return x[keep], y[keep], None if cand is None else cand[keep]


def _subsample(
    spec: DatasetSpec, info: DatasetInfo, what: str, x: np.ndarray, y: np.ndarray, cand: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The seeded, class-stratified subset ``spec.<what>`` of one part (all of it when unset)."""
    n, purpose = (spec.subsample, 1) if what == "subsample" else (spec.test_subsample, 2)
    if n is None:
        return x, y, cand
    if n > len(y):
        raise ValueError(
            f"{spec.name}: {what}={n} exceeds the {len(y)} available "
            f"{'training' if purpose == 1 else 'test'} {'samples' if info.kind == 'features' else 'images'}"
        )
    keep = stratified_subset(y, n, _subset_rng(spec.subsample_seed, purpose))
    return x[keep], y[keep], None if cand is None else cand[keep]


def _load_parts(spec: DatasetSpec, info: DatasetInfo) -> tuple[Arrays, np.ndarray | None, tuple[str, ...], bool]:
    """The loader's arrays, the shipped candidate sets, the class names and whether labels exist."""
    if info.kind == "features":
        arrays, cand, names = _load_pll_mat(spec)
        return arrays, cand, _class_names_of(spec, names), True
    if spec.name == "image_folder":
        from trainables.data.image_folder import load_image_folder

        folder = load_image_folder(spec, _class_names_of)
        return folder.arrays, None, folder.class_names, folder.labeled
    return _LOADERS[spec.name](spec), None, info.class_names, True


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Load a data set described by a grid.yaml ``datasets:`` entry.

    Raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) naming the directory looked at,
    the expected files and how to provide them, and ``ValueError`` for impossible subset sizes.
    """
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; allowed: {', '.join(sorted(DATASETS))}")
    info = DATASETS[spec.name]
    (train_x, train_y, test_x, test_y, source), train_cand, class_names, labeled = _load_parts(spec, info)
    if train_cand is not None and train_cand.shape != (len(train_y), len(class_names)):
        raise ValueError(f"{spec.name}: candidate sets are {train_cand.shape}, expected ({len(train_y)}, {len(class_names)})")
    for what, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _check_arrays(spec, info, len(class_names), what, x, y, labeled)
    if labeled:
        train_x, train_y, train_cand = _long_tailed(spec, train_x, train_y, train_cand, len(class_names))
    elif spec.imbalance_ratio is not None:
        raise ValueError(f"{spec.name}: imbalance_ratio needs labels to subsample per class; {spec.path} has none")
    if info.kind == "features":
        mean, std = feature_stats(train_x, spec.feature_scaling or "per_feature")  # the split's training part only
    else:
        mean, std = channel_stats(train_x)

    # Unlabeled images all carry -1: their "stratified" subset is a plain seeded one.
    train_x, train_y, train_cand = _subsample(spec, info, "subsample", train_x, train_y, train_cand)
    test_x, test_y, _ = _subsample(spec, info, "test_subsample", test_x, test_y, None)
    identity: dict[str, Any] = {
        "name": spec.name,
        "split": source["split"],
        "subsample": spec.subsample,
        "test_subsample": spec.test_subsample,
        "num_train": int(len(train_y)),
        "num_test": int(len(test_y)),
        "sha256": fingerprint(train_x, train_y, test_x, test_y, *(() if train_cand is None else (train_cand,))),
    }
    if spec.subsample is not None or spec.test_subsample is not None or spec.imbalance_ratio is not None:
        identity["subsample_seed"] = spec.subsample_seed  # the digits split carries its own seed
    if spec.imbalance_ratio is not None:
        identity["imbalance_ratio"] = spec.imbalance_ratio
    if info.from_path:
        identity["class_names"] = list(class_names)
    return Dataset(
        name=spec.name,
        train_x=np.ascontiguousarray(train_x),
        train_y=train_y,
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
        class_names=list(class_names),
        mean=mean,
        std=std,
        hflip=info.hflip,
        default_backbone=info.default_backbone,
        identity=identity,
        kind=info.kind,
        train_cand=train_cand,
        labeled=labeled,
    )
