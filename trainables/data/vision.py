"""The papers' other image data sets: EuroSAT, GTSRB and FER2013 (Co-Reg, AAAI 2025, section 5 and
appendix A.2), read from torchvision's layouts; images are decoded once and cached like an image
folder's (``trainables/data/image_folder.py``).

- ``eurosat`` (Helber et al. 2019, the RGB version): torchvision's ``EuroSAT`` layout
  ``<root>/eurosat/2750/<Class>/*.jpg`` (27,000 64x64 images, 10 classes). Class descriptions are
  torchvision's folder names (the paper: "class descriptions from PyTorch"). No official split: a
  seeded, class-stratified 80/20 split (seed ``subsample_seed``).
- ``gtsrb`` (Houben et al. 2013): torchvision's ``GTSRB`` layout ``<root>/gtsrb/GTSRB/Training/
  000NN/*.ppm`` (39,209 images) and ``<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm`` with
  ``<root>/gtsrb/GT-final_test.csv`` (12,630), the official split. Sizes vary (15 to 250 pixels):
  each image is resized to 64x64 (shorter side, centre crop). Class descriptions: the paper's
  appendix A.2 ("German Traffic Sign: Speed limit 20", ...). No horizontal flip (it turns "Turn
  left" into "Turn right").
- ``fer2013`` (Goodfellow et al. 2013): the Kaggle CSV in torchvision's layout, ``<root>/fer2013/``
  holding ``fer2013.csv`` (``emotion,pixels,Usage``) or ``icml_face_data.csv`` (``emotion, Usage,
  pixels``): training = ``Training``, test = ``PublicTest`` + ``PrivateTest`` (torchvision's
  split); or only ``train.csv`` (``emotion,pixels``; Kaggle's ``test.csv`` has no labels), then a
  seeded, class-stratified 80/20 split. 48x48 grayscale faces, upsampled to 64x64 (1 channel) as in
  the paper. Class descriptions: appendix A.2 ("Angry Facial Expression", ...). The CSV is parsed
  here: torchvision's reader insists on the Kaggle files' md5 sums, and the files cannot be
  downloaded automatically (Kaggle needs a login).

Offline, a missing data set raises the same :class:`~trainables.data.datasets.DatasetNotFoundError`
as CIFAR's, naming the directory, the files and the layout (``download: true`` lets torchvision
fetch EuroSAT and GTSRB).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainables.data.spec import DatasetSpec

SIZE = 64
"""The paper's resolution of EuroSAT, GTSRB and FER2013."""
TEST_FRACTION = 0.2

EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip

GTSRB_CLASSES = (
    'German Traffic Sign: Speed limit 20',
    'German Traffic Sign: Speed limit 30',
    'German Traffic Sign: Speed limit 50',
    'German Traffic Sign: Speed limit 60',
    'German Traffic Sign: Speed limit 70',
    'German Traffic Sign: Speed limit 80',
    'German Traffic Sign: Speed limit 80 cancelled',
    'German Traffic Sign: Speed limit 100',
    'German Traffic Sign: Speed limit 120',
    'German Traffic Sign: No passing',
    'German Traffic Sign: No truck overtaking',
    'German Traffic Sign: Only have priority at the next intersection',
    'German Traffic Sign: Priority road',
    'German Traffic Sign: Give way',
    'German Traffic Sign: Stop',
    'German Traffic Sign: All vehicles prohibited',
    'German Traffic Sign: Trucks prohibited',
    'German Traffic Sign: No entry',
    'German Traffic Sign: Caution!',
    'German Traffic Sign: Curve (to the left)',
    'German Traffic Sign: Curve (to the right)',
    'German Traffic Sign: Continuous curves',
    'German Traffic Sign: Rough road',
    'German Traffic Sign: Slippery road',
    'German Traffic Sign: The road narrows on the right',
    'German Traffic Sign: Construction site',
    'German Traffic Sign: Signal light',
    'German Traffic Sign: Pay attention to pedestrians',
    'German Traffic Sign: Pay attention to children',
    'German Traffic Sign: Watch out for bikes',
    'German Traffic Sign: Watch out for snow/ice on the road',
    'German Traffic Sign: Deer ahead',
    'German Traffic Sign: Unlimited speed',
    'German Traffic Sign: Turn right',
    'German Traffic Sign: Turn left',
    'German Traffic Sign: Go straight',
    'German Traffic Sign: Go straight and turn right',
    'German Traffic Sign: Go straight and turn left',
    'German Traffic Sign: Drive on the right',
    'German Traffic Sign: Drive on the left',
    'German Traffic Sign: Driving around the island',
    'German Traffic Sign: Lift ban on no passing',
    'German Traffic Sign: Lift ban on truck overtaking',
)  # the paper's appendix A.2, in class-id order

FER2013_CLASSES = (
    "Angry Facial Expression", "Disgust Facial Expression", "Fear Facial Expression", "Happy Facial Expression",
    "Sad Facial Expression", "Surprise Facial Expression", "Neutral Facial Expression",
)  # fmt: skip  # the paper's appendix A.2 (FER2013's emotion codes 0..6)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


def seeded_split(x: np.ndarray, y: np.ndarray, seed: int, source: dict[str, Any]) -> Arrays:
    """A seeded, class-stratified 80/20 train/test split of data without an official one."""
    from trainables.data.datasets import _subset_rng, stratified_subset

    test = np.zeros(len(y), dtype=bool)
    test[stratified_subset(y, max(1, round(TEST_FRACTION * len(y))), _subset_rng(seed, 0))] = True
    split = {"test_fraction": TEST_FRACTION, "seed": seed, "stratified": True}
    return x[~test], y[~test], x[test], y[test], {**source, "split": split}


def _decode(spec: DatasetSpec, samples: list[tuple[str, int]], base: Path, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from trainables.data.image_folder import cache_dir, cached_decode

    files = [Path(p) for p, _ in samples]
    labels = [int(t) for _, t in samples]
    return cached_decode(files, base, labels, SIZE, channels, cache_dir(spec)), np.asarray(labels, dtype=np.int64)


def load_eurosat(spec: DatasetSpec) -> Arrays:
    from torchvision.datasets import EuroSAT

    from trainables.data.datasets import _call_torchvision, _torchvision_root

    root = _torchvision_root(spec)
    expected = f"{root / 'eurosat' / '2750'}/<class>/*.jpg for the 10 classes {', '.join(EUROSAT_CLASSES)}"
    layout = "torchvision's layout (<root>/eurosat/2750/<class>/*.jpg, the RGB EuroSAT zip unpacked)"
    ds = _call_torchvision("eurosat", root, expected, layout, lambda: EuroSAT(str(root), download=spec.download))
    if tuple(ds.classes) != EUROSAT_CLASSES:
        raise ValueError(f"eurosat: the class folders of {root / 'eurosat' / '2750'} are {ds.classes}, expected {list(EUROSAT_CLASSES)}")
    x, y = _decode(spec, ds.samples, root)
    return seeded_split(x, y, spec.subsample_seed, {"source": "torchvision.datasets.EuroSAT", "root": str(root)})


def load_gtsrb(spec: DatasetSpec) -> Arrays:
    from torchvision.datasets import GTSRB

    from trainables.data.datasets import _call_torchvision, _torchvision_root

    root = _torchvision_root(spec)
    base = root / "gtsrb"
    expected = (
        f"{base}/GTSRB/Training/000NN/*.ppm (NN = 00..42), {base}/GTSRB/Final_Test/Images/*.ppm and {base}/GT-final_test.csv"
    )
    layout = "torchvision's layout (<root>/gtsrb/GTSRB/Training, <root>/gtsrb/GTSRB/Final_Test/Images, <root>/gtsrb/GT-final_test.csv)"
    parts = []
    for split in ("train", "test"):
        ds = _call_torchvision("gtsrb", root, expected, layout, lambda: GTSRB(str(root), split=split, download=spec.download))
        # Training labels from the folder names (000NN), not from the position of a folder among those present.
        samples = [(p, int(Path(p).parent.name) if split == "train" else t) for p, t in ds._samples]
        bad = sorted({t for _, t in samples if not 0 <= t < len(GTSRB_CLASSES)})
        if bad or not samples:
            raise ValueError(f"gtsrb: {split} holds class ids {bad or 'none'}; expected images of 00..42 under {expected}")
        parts.append(_decode(spec, samples, base))
    (train_x, train_y), (test_x, test_y) = parts
    return train_x, train_y, test_x, test_y, {"source": "torchvision.datasets.GTSRB", "root": str(root), "split": "official"}


FER_FILES = ("fer2013.csv", "icml_face_data.csv", "train.csv")
"""The CSVs read, in torchvision's order of precedence."""


def _fer_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 48, 48) uint8, emotions (N,), usage (N,) str) of a FER2013 CSV (keys stripped:
    ``icml_face_data.csv`` writes ``" pixels"``)."""
    images, labels, usage = [], [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            pixels = np.array(row.get("pixels", "").split(), dtype=np.int64)
            if pixels.size != 48 * 48 or row.get("emotion", "").strip() == "" or pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(f"fer2013: {path} row {i + 2} is not `emotion` plus 2304 pixel values in 0..255")
            images.append(pixels.astype(np.uint8).reshape(48, 48))
            labels.append(int(row["emotion"]))
            usage.append(row.get("Usage", "Training").strip())
    if not images:
        raise ValueError(f"fer2013: {path} holds no rows")
    return np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(usage)


def _upsample(faces: np.ndarray) -> np.ndarray:
    """(N, 48, 48) -> (N, 1, 64, 64) uint8, bicubic (the paper's 64x64)."""
    from PIL import Image

    out = np.empty((len(faces), 1, SIZE, SIZE), dtype=np.uint8)
    for i, face in enumerate(faces):
        out[i, 0] = np.asarray(Image.fromarray(face).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return out


def load_fer2013(spec: DatasetSpec) -> Arrays:
    import hashlib

    from trainables.data.datasets import DatasetNotFoundError, _torchvision_root
    from trainables.data.image_folder import FORMAT, cache_dir, npz_cache

    root = _torchvision_root(spec)
    folder = root / "fer2013"
    path = next((folder / name for name in FER_FILES if (folder / name).is_file()), None)
    if path is None:
        raise DatasetNotFoundError(
            f"fer2013: data set files not found under {root}. Expected {folder}/fer2013.csv (or icml_face_data.csv, "
            f"or train.csv), torchvision's layout. Set the dataset's `root:` in grid.yaml to the directory holding "
            f"fer2013/; the CSV cannot be downloaded automatically (Kaggle, 'Challenges in Representation Learning: "
            f"Facial Expression Recognition Challenge', needs a login)."
        )
    st = path.stat()
    key = hashlib.sha256(f"fer2013\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{FORMAT}\0{SIZE}".encode()).hexdigest()[:32]

    def build() -> dict[str, np.ndarray]:
        faces, labels, usage = _fer_rows(path)
        return {"x": _upsample(faces), "y": labels, "test": usage != "Training"}

    arrays = npz_cache(cache_dir(spec), key, build)
    x, y, test = arrays["x"], arrays["y"], arrays["test"]
    source = {"source": f"fer2013 csv ({path.name})", "root": str(root)}
    if path.name == "train.csv":  # Kaggle's test.csv has no labels: hold out 20% of train.csv
        return seeded_split(x, y, spec.subsample_seed, source)
    if not test.any() or test.all():
        raise ValueError(f"fer2013: {path} needs rows of Usage Training and of PublicTest / PrivateTest")
    return x[~test], y[~test], x[test], y[test], {**source, "split": "official (Training / PublicTest + PrivateTest)"}
