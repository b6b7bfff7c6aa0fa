"""A user's own images (``{name: image_folder, path: ...}``): read once, resized, cached on disk.

Two layouts of ``path`` (torchvision's ``ImageFolder`` convention for the first):

- **one subfolder per class** (``path/<class>/*.jpg``): the subfolder names, sorted, are the classes
  (the grid's ``class_names`` may replace them, one per subfolder in sorted order, e.g. to prompt
  a VLM with descriptions). The labels are ground truth: they serve evaluation and the revealed
  few-shot samples only. Without ``test_path`` a seeded, class-stratified 20% is held out as the
  test set (seed ``subsample_seed``).
- **a flat folder of unlabeled images** (``path/*.png``) plus ``class_names`` (a list, or a text
  file with one name per line): the real use, a VLM annotates them and no label exists. There is
  no accuracy then: ``Dataset.labeled`` is False, ``train_y`` is -1 and, without ``test_path``,
  the test set is empty.

``test_path`` is a labeled folder with one subfolder per class, named as the training classes
(the class-subfolder layout) or as ``class_names`` (the flat layout).

Every file PIL can open counts as an image (its registered extensions, any case); other files
(``README.txt``, ``.DS_Store``) are skipped. Each image is converted to RGB (``channels: 3``, the
default) or grayscale (``channels: 1``), its shorter side resized to ``image_size`` (bicubic) and
the centre cropped to a square (torchvision's ``Resize`` + ``CenterCrop``), so any size and aspect
ratio works. Decoding runs in a thread pool (PIL releases the GIL while it decodes and resizes).

The decoded arrays are cached as ``<cache>/<key>.npz`` with ``<cache>`` = ``<root>/image_folder_cache``
(``root`` from the grid, default ``$COREG_DATA_ROOT``): the key hashes every file's relative path,
size and modification time with the size, channels and this module's format version, so a
changed, added or removed image is decoded again and nothing else is; every trial of a sweep
reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainables.data.spec import DatasetSpec

FORMAT = 1
"""Bump when the decoding changes (part of every cache key)."""
DEFAULT_SIZE, DEFAULT_CHANNELS = 32, 3
TEST_FRACTION = 0.2
LAYOUT = (
    "a folder with one subfolder of images per class (<path>/<class>/*.png|jpg|...), or a flat folder "
    "of images (<path>/*.png|jpg|...) together with `class_names`"
)


@dataclass
class FolderData:
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]
    """(train_x, train_y, test_x, test_y, source) as the other loaders return them."""
    class_names: tuple[str, ...]
    labeled: bool


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions PIL has a reader for (``.png``, ``.jpg``, ``.webp``, ``.tif``...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _images_in(folder: Path, extensions: frozenset[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def scan(folder: Path) -> tuple[list[Path], list[str], list[int]]:
    """(files, class names, labels) of a folder: labels from the class subfolders, or -1 for a flat
    folder (empty class names). Raises :class:`DatasetNotFoundError` naming the path and the layout."""
    from trainables.data.datasets import DatasetNotFoundError

    if not folder.is_dir():
        raise DatasetNotFoundError(f"image_folder: {folder} is not a directory. Expected {LAYOUT}")
    ext = image_extensions()
    flat = _images_in(folder, ext)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _images_in(d, ext) for d in subdirs}
    with_images = {name: files for name, files in per_class.items() if files}
    if flat and with_images:
        raise DatasetNotFoundError(
            f"image_folder: {folder} holds both images ({flat[0].name}, ...) and class subfolders with images "
            f"({', '.join(list(with_images)[:3])}, ...): use one layout. Expected {LAYOUT}"
        )
    if flat:
        return flat, [], [-1] * len(flat)
    if not with_images:
        raise DatasetNotFoundError(f"image_folder: {folder} holds no image PIL can read (looked for {', '.join(sorted(ext)[:8])}, ...). Expected {LAYOUT}")
    empty = sorted(set(per_class) - set(with_images))
    if empty:
        raise DatasetNotFoundError(f"image_folder: the class subfolder(s) {empty} of {folder} hold no image. Expected {LAYOUT}")
    names = list(with_images)
    files = [f for name in names for f in with_images[name]]
    labels = [k for k, name in enumerate(names) for _ in with_images[name]]
    return files, names, labels


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (channels, size, size): converted, shorter side resized, centre cropped."""
    from PIL import Image

    from trainables.data.datasets import DatasetNotFoundError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            scale = size / min(w, h)
            w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((w2, h2), Image.Resampling.BICUBIC)
            left, top = (w2 - size) // 2, (h2 - size) // 2
            arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetNotFoundError(f"image_folder: {path} is not an image PIL can read ({type(err).__name__}: {err})") from err
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _cache_key(files: list[Path], base: Path, labels: list[int], size: int, channels: int) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "size": size, "channels": channels}).encode())
    for f, y in zip(files, labels):
        st = f.stat()
        h.update(f"{f.relative_to(base)}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\n".encode())
    return h.hexdigest()[:32]


def decode_all(files: list[Path], size: int, channels: int, workers: int | None = None) -> np.ndarray:
    """Every file decoded, in order, by a thread pool: (N, channels, size, size) uint8."""
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda f: decode(f, size, channels), files)):
            out[i] = arr
    return out


def npz_cache(cache: Path, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of ``<cache>/<key>.npz``, built with ``build()`` and written atomically (concurrent
    trials are safe) when absent or unreadable."""
    entry = cache / f"{key}.npz"
    if entry.is_file():
        try:
            with np.load(entry) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):  # a truncated entry is built again
            pass
    arrays = build()
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp.npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, entry)
    return arrays


def cached_decode(files: list[Path], base: Path, labels: list[int], size: int, channels: int, cache: Path) -> np.ndarray:
    """``decode_all`` through the on-disk cache."""
    key = _cache_key(files, base, labels, size, channels)
    x = npz_cache(cache, key, lambda: {"x": decode_all(files, size, channels)})["x"]
    if x.shape != (len(files), channels, size, size):  # cannot happen unless the entry was replaced
        raise ValueError(f"image cache entry {cache / key}.npz holds {x.shape}, expected {(len(files), channels, size, size)}")
    return x


def cache_dir(spec: DatasetSpec) -> Path:
    """Where decoded images are cached: ``<root>/image_folder_cache`` (``root`` default ``$COREG_DATA_ROOT``)."""
    from trainables.data.datasets import default_data_root

    return (Path(spec.root) if spec.root is not None else default_data_root()) / "image_folder_cache"


Scanned = tuple[list[Path], list[str], list[int]]
"""What :func:`scan` finds: files, class names, labels."""


def _read(folder: Path, spec: DatasetSpec, scanned: Scanned | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded images (through the cache), labels and class names of ``folder``."""
    files, names, labels = scanned or scan(folder)
    size, channels = spec.image_size or DEFAULT_SIZE, spec.channels or DEFAULT_CHANNELS
    x = cached_decode(files, folder, labels, size, channels, cache_dir(spec))
    return x, np.asarray(labels, dtype=np.int64), names


def _read_test(folder: Path, spec: DatasetSpec, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A labeled test folder: its subfolders are named as training classes (``classes``); a class
    may have none. Labels are the training classes' indices."""
    from trainables.data.datasets import DatasetNotFoundError

    x, y, names = _read(folder, spec)
    unknown = [n for n in names if n not in classes]
    if not names or unknown:
        raise DatasetNotFoundError(
            f"image_folder: the test folder {folder} has class subfolders {names}"
            f"{f' ({unknown} are not training classes)' if names else ''}; expected subfolders named as the "
            f"training classes {classes} (one per class)"
        )
    index = np.array([classes.index(n) for n in names], dtype=np.int64)
    return x, index[y]


def load_image_folder(spec: DatasetSpec, names_of: Callable[[DatasetSpec, tuple[str, ...]], tuple[str, ...]]) -> FolderData:
    """The training (and test) images of ``spec.path`` (``spec.test_path``). ``names_of(spec, found)``
    applies the grid's ``class_names`` (``datasets._class_names_of``)."""
    from trainables.data.datasets import DatasetNotFoundError, _subset_rng, stratified_subset

    folder = Path(str(spec.path))
    scanned = scan(folder)
    labeled = bool(scanned[1])
    if not labeled and spec.class_names is None:
        raise DatasetNotFoundError(
            f"image_folder: {folder} is a flat folder of unlabeled images; give `class_names` (a list, or a file "
            f"with one class name per line) so that an annotator knows the classes. Expected {LAYOUT}"
        )
    if not labeled and spec.imbalance_ratio is not None:  # refused before anything is decoded
        raise ValueError(f"image_folder: imbalance_ratio needs labels to subsample per class; {folder} has none")
    x, y, found = _read(folder, spec, scanned)
    class_names = names_of(spec, tuple(found))
    source: dict[str, Any] = {"source": "image_folder", "path": str(folder), "layout": "class subfolders" if labeled else "flat, unlabeled"}
    if spec.test_path is not None:
        test_x, test_y = _read_test(Path(spec.test_path), spec, found or list(class_names))
        return FolderData((x, y, test_x, test_y, {**source, "split": {"test_path": spec.test_path}}), class_names, labeled)
    if not labeled:
        empty = np.empty((0, *x.shape[1:]), dtype=np.uint8)
        return FolderData((x, y, empty, np.empty(0, dtype=np.int64), {**source, "split": "no test set"}), class_names, labeled)
    test = np.zeros(len(y), dtype=bool)
    test[stratified_subset(y, max(1, round(TEST_FRACTION * len(y))), _subset_rng(spec.subsample_seed, 0))] = True
    split = {"test_fraction": TEST_FRACTION, "seed": spec.subsample_seed, "stratified": True}
    return FolderData((x[~test], y[~test], x[test], y[test], {**source, "split": split}), class_names, labeled)
