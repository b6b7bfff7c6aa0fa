"""EuroSAT, GTSRB and FER2013 from tiny trees and CSVs written here in their real layouts
(torchvision's), and the offline errors. Each class gets its own grey level or colour, so a decoded
pixel tells its label."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from trainables.data.datasets import DATASETS, DatasetNotFoundError, load_dataset
from trainables.data.spec import DatasetSpec
from trainables.data.vision import EUROSAT_CLASSES, FER2013_CLASSES, GTSRB_CLASSES


def colour(k: int) -> tuple[int, int, int]:
    return (20 * k % 256, 255 - 5 * k, 7 * k % 256)


def save(path: Path, rgb: tuple[int, int, int], size: tuple[int, int], mark: int | None = None) -> None:
    """A solid image with a ``mark`` grey block in its top-left corner (tells images of a class apart)."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    if mark is not None:
        ImageDraw.Draw(img).rectangle((0, 0, 15, 15), fill=(mark, mark, mark))
    img.save(path)


def test_registry_has_the_papers_descriptions_and_sizes():
    assert (DATASETS["eurosat"].channels, DATASETS["eurosat"].image_size, DATASETS["eurosat"].num_classes) == (3, 64, 10)
    assert (DATASETS["gtsrb"].channels, DATASETS["gtsrb"].image_size, DATASETS["gtsrb"].num_classes) == (3, 64, 43)
    assert (DATASETS["fer2013"].channels, DATASETS["fer2013"].image_size, DATASETS["fer2013"].num_classes) == (1, 64, 7)
    assert GTSRB_CLASSES[0] == "German Traffic Sign: Speed limit 20" and GTSRB_CLASSES[-1] == "German Traffic Sign: Lift ban on truck overtaking"
    assert GTSRB_CLASSES[14] == "German Traffic Sign: Stop" and len(set(GTSRB_CLASSES)) == 43
    assert FER2013_CLASSES[3] == "Happy Facial Expression" and len(FER2013_CLASSES) == 7
    assert not DATASETS["gtsrb"].hflip  # a flipped "Turn left" is "Turn right"
    assert list(EUROSAT_CLASSES) == sorted(EUROSAT_CLASSES)  # torchvision's folder order


# ------------------------------------------------------------------------------------------ EuroSAT


def write_eurosat(root: Path, per_class: int = 5) -> None:
    for k, name in enumerate(EUROSAT_CLASSES):
        for i in range(per_class):
            save(root / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", colour(k), (64, 64) if i else (70, 50), 40 * i)


def test_eurosat_tree_is_read_split_80_20_and_cached(tmp_path):
    write_eurosat(tmp_path)
    ds = load_dataset(DatasetSpec(name="eurosat", root=str(tmp_path)))
    assert ds.train_x.shape == (40, 3, 64, 64) and ds.test_x.shape == (10, 3, 64, 64)
    assert np.bincount(ds.test_y, minlength=10).tolist() == [1] * 10  # stratified
    centre = ds.train_x[:, :, 32, 32].astype(int)
    assert np.abs(centre - np.array([colour(k) for k in ds.train_y])).max() <= 8  # JPEG
    assert ds.class_names == list(EUROSAT_CLASSES) and ds.identity["split"]["test_fraction"] == 0.2
    assert list((tmp_path / "image_folder_cache").glob("*.npz"))  # decoded once, cached beside the data
    other = load_dataset(DatasetSpec(name="eurosat", root=str(tmp_path), subsample_seed=3))
    assert other.identity["sha256"] != ds.identity["sha256"]


def test_eurosat_offline_error_names_the_layout_and_wrong_classes_are_refused(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DatasetSpec(name="eurosat", root=str(tmp_path)))
    message = str(err.value)
    assert f"eurosat: data set files not found or unreadable under {tmp_path}" in message
    assert "eurosat/2750/<class>/*.jpg" in message and "download: true" in message
    for name in ("Forest", "River"):
        save(tmp_path / "eurosat" / "2750" / name / "a.jpg", (1, 1, 1), (64, 64))
    with pytest.raises(ValueError, match=re.escape("are ['Forest', 'River'], expected ['AnnualCrop'")):
        load_dataset(DatasetSpec(name="eurosat", root=str(tmp_path)))


# -------------------------------------------------------------------------------------------- GTSRB


def write_gtsrb(root: Path, classes=(0, 5, 14, 42), per_class: int = 3, test_per_class: int = 2) -> None:
    base = root / "gtsrb"
    sizes = [(29, 30), (64, 64), (120, 110)]
    for k in classes:
        for i in range(per_class):
            save(base / "GTSRB" / "Training" / f"{k:05d}" / f"00000_{i:05d}.ppm", colour(k), sizes[i % 3])
    rows = []
    for j, k in enumerate(c for c in classes for _ in range(test_per_class)):
        name = f"{j:05d}.ppm"
        save(base / "GTSRB" / "Final_Test" / "Images" / name, colour(k), sizes[j % 3])
        rows.append([name, 30, 30, 5, 5, 25, 25, k])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)


def test_gtsrb_official_split_with_labels_from_folder_names(tmp_path):
    write_gtsrb(tmp_path)
    ds = load_dataset(DatasetSpec(name="gtsrb", root=str(tmp_path)))
    assert ds.train_x.shape == (12, 3, 64, 64) and ds.test_x.shape == (8, 3, 64, 64)
    assert sorted(set(ds.train_y.tolist())) == [0, 5, 14, 42]  # not 0..3: the folder names are the ids
    assert ds.test_y.tolist() == [0, 0, 5, 5, 14, 14, 42, 42]
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert np.abs(x[:, :, 32, 32].astype(int) - np.array([colour(k) for k in y])).max() <= 2  # PPM is lossless
    assert ds.identity["split"] == "official" and ds.num_classes == 43 and not ds.hflip


def test_gtsrb_missing_test_part_is_the_offline_error(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"gtsrb: data set files not found or unreadable .*GT-final_test\.csv"):
        load_dataset(DatasetSpec(name="gtsrb", root=str(tmp_path)))


# ------------------------------------------------------------------------------------------ FER2013


def faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 7
    x = np.repeat((y * 30 + 20).astype(np.uint8)[:, None], 48 * 48, axis=1)  # (N, 2304) a grey level per class
    x[:, :10] = rng.integers(0, 256, (n, 10))
    return x, y


def write_fer(root: Path, name: str = "fer2013.csv", n: int = 35, usage=True) -> tuple[np.ndarray, np.ndarray]:
    x, y = faces(n)
    folder = root / "fer2013"
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["Training"] * (n - 14) + ["PublicTest"] * 7 + ["PrivateTest"] * 7
    with open(folder / name, "w", newline="") as f:
        w = csv.writer(f)
        if name == "icml_face_data.csv":
            w.writerow(["emotion", " Usage", " pixels"])
            w.writerows([k, u, " ".join(map(str, p))] for k, u, p in zip(y, kinds, x))
        elif usage:
            w.writerow(["emotion", "pixels", "Usage"])
            w.writerows([k, " ".join(map(str, p)), u] for k, p, u in zip(y, x, kinds))
        else:
            w.writerow(["emotion", "pixels"])
            w.writerows([k, " ".join(map(str, p))] for k, p in zip(y, x))
    return x, y


@pytest.mark.parametrize("name", ["fer2013.csv", "icml_face_data.csv"])
def test_fer2013_csv_official_split_1_channel_64(tmp_path, name):
    _, y = write_fer(tmp_path, name)
    ds = load_dataset(DatasetSpec(name="fer2013", root=str(tmp_path)))
    assert ds.train_x.shape == (21, 1, 64, 64) and ds.test_x.shape == (14, 1, 64, 64)
    assert np.array_equal(ds.train_y, y[:21]) and np.array_equal(ds.test_y, y[21:])
    assert np.abs(ds.train_x[:, 0, 40, 40].astype(int) - (ds.train_y * 30 + 20)).max() <= 1  # upsampled, same grey
    assert ds.class_names == list(FER2013_CLASSES) and len(ds.mean) == 1


def test_fer2013_train_csv_only_gets_a_seeded_split(tmp_path):
    write_fer(tmp_path, "train.csv", n=70, usage=False)
    ds = load_dataset(DatasetSpec(name="fer2013", root=str(tmp_path)))
    assert len(ds.train_y) == 56 and len(ds.test_y) == 14 and np.bincount(ds.test_y).tolist() == [2] * 7


def test_fer2013_missing_or_malformed_csv(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"fer2013/fer2013\.csv \(or icml_face_data\.csv, or train\.csv\).*cannot be downloaded automatically"):
        load_dataset(DatasetSpec(name="fer2013", root=str(tmp_path)))
    folder = tmp_path / "fer2013"
    folder.mkdir()
    (folder / "fer2013.csv").write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(ValueError, match=r"fer2013\.csv row 2 is not `emotion` plus 2304 pixel values"):
        load_dataset(DatasetSpec(name="fer2013", root=str(tmp_path)))
