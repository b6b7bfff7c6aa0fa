"""A user's own images (``image_folder``): both layouts, any size and format PIL reads, the on-disk
cache, and the refusals (before Ray) of a missing or malformed folder.

Images are written here with PIL: PNG and JPEG, RGB, RGBA, grayscale and palette, of mixed sizes
and aspect ratios. Each class has its own solid colour, so a decoded pixel tells its class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.annotation.stage import annotate, dataset_candidate_stats
from orchestrator.config import SyntheticAnnotatorSpec, parse_grid
from trainables.data import image_folder
from trainables.data.datasets import DatasetNotFoundError, load_dataset
from trainables.data.spec import DatasetSpec

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fox": (30, 30, 200)}
SIZES = [(40, 40), (64, 48), (31, 77), (120, 90), (50, 50)]
MODES = ["RGB", "RGBA", "L", "P", "RGB"]


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int], mode: str) -> None:
    from PIL import Image

    img = Image.new("RGB", size, colour)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


def write_class_tree(root: Path, per_class: int = 5, classes=COLOURS) -> None:
    for name, colour in classes.items():
        for i in range(per_class):
            k = i % len(SIZES)
            ext = ".jpg" if i % 2 and MODES[k] in ("RGB", "L") else ".png"
            write_image(root / name / f"{name}_{i}{ext.upper() if i == 3 else ext}", colour, SIZES[k], MODES[k])
    if "cat" in classes:
        (root / "cat" / "notes.txt").write_text("not an image: skipped")


@pytest.fixture
def tree(tmp_path):
    write_class_tree(tmp_path / "train")
    return tmp_path


def spec(tmp_path: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="image_folder", path=str(tmp_path / "train"), root=str(tmp_path / "data"), **kw)


def test_class_subfolders_give_classes_labels_and_a_seeded_split(tree):
    ds = load_dataset(spec(tree, image_size=16))
    assert ds.class_names == ["cat", "dog", "fox"] and ds.labeled
    assert ds.train_x.shape == (12, 3, 16, 16) and ds.test_x.shape == (3, 3, 16, 16) and ds.train_x.dtype == np.uint8
    assert np.bincount(ds.test_y).tolist() == [1, 1, 1]  # stratified 20%
    for x, y in [(ds.train_x, ds.train_y), (ds.test_x, ds.test_y)]:
        centre = x[:, :, 8, 8].astype(int)  # (N, 3): the class colour, through every mode and format
        expected = np.array([COLOURS[ds.class_names[k]] for k in y])
        gray = centre.max(1) - centre.min(1) < 3  # images saved as grayscale come back gray
        assert np.abs(centre - expected)[~gray].max() <= 12
    other = load_dataset(spec(tree, image_size=16, subsample_seed=1))
    assert other.identity["sha256"] != ds.identity["sha256"]


def test_grayscale_size_and_a_labeled_test_folder(tree):
    write_class_tree(tree / "test", per_class=2)
    ds = load_dataset(spec(tree, image_size=24, channels=1, test_path=str(tree / "test")))
    assert ds.train_x.shape == (15, 1, 24, 24) and ds.test_x.shape == (6, 1, 24, 24)
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2] and len(ds.mean) == 1
    write_class_tree(tree / "some", per_class=1, classes={"fox": (1, 1, 1)})  # a class may have no test images
    assert load_dataset(spec(tree, test_path=str(tree / "some"))).test_y.tolist() == [2]  # the training class's index
    write_class_tree(tree / "wrong", per_class=1, classes={"cat": (0, 0, 0), "emu": (1, 1, 1)})
    with pytest.raises(DatasetNotFoundError, match=r"test folder .*wrong has class subfolders \['cat', 'emu'\] \(\['emu'\] are not training classes\)"):
        load_dataset(spec(tree, test_path=str(tree / "wrong")))


def test_shorter_side_resized_then_centre_cropped():
    from PIL import Image

    stripes = np.zeros((30, 90, 3), dtype=np.uint8)  # (H, W, 3): red | green | blue thirds
    stripes[:, :30, 0] = stripes[:, 30:60, 1] = stripes[:, 60:, 2] = 255
    path = Path(__import__("tempfile").mkdtemp()) / "wide.png"
    Image.fromarray(stripes).save(path)
    out = image_folder.decode(path, 12, 3)  # 90x30 -> 36x12 -> the centre 12x12: the green third
    assert out.shape == (3, 12, 12) and (out[1] > 200).all() and (out[0] < 40).all() and (out[2] < 40).all()


def test_flat_unlabeled_folder_with_a_names_file(tmp_path):
    for i, (size, mode) in enumerate(zip(SIZES, MODES)):
        write_image(tmp_path / "train" / f"img{i}.{'jpg' if mode == 'RGB' else 'png'}", (90, 90, 90), size, mode)
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    ds = load_dataset(spec(tmp_path, class_names=str(tmp_path / "names.txt")))
    assert not ds.labeled and ds.class_names == ["cat", "dog", "fox"]
    assert ds.train_x.shape == (5, 3, 32, 32) and (ds.train_y == -1).all()
    assert ds.test_x.shape == (0, 3, 32, 32) and ds.identity["split"] == "no test set"
    # Annotation statistics without labels: the set size only, never a made-up accuracy.
    cand = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 1]], dtype=bool)
    assert dataset_candidate_stats(ds, cand) == {"mean_set_size": pytest.approx(8 / 5)}
    with pytest.raises(ValueError, match="draws sets from true labels, and image_folder has none"):
        annotate(ds, SyntheticAnnotatorSpec(kind="synthetic"), q=0.1, eta=0.1, cache_dir=tmp_path / "ann")
    with pytest.raises(DatasetNotFoundError, match=r"flat folder of unlabeled images; give `class_names`"):
        load_dataset(spec(tmp_path))
    with pytest.raises(ValueError, match="imbalance_ratio needs labels"):
        load_dataset(spec(tmp_path, class_names=("a", "b"), imbalance_ratio=2.0))


def test_decoded_once_then_read_from_the_cache(tree, monkeypatch):
    first = load_dataset(spec(tree))
    entries = list((tree / "data" / "image_folder_cache").glob("*.npz"))
    assert len(entries) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder, "decode_all", no_decoding)
    again = load_dataset(spec(tree))
    assert again.identity["sha256"] == first.identity["sha256"]
    monkeypatch.undo()
    write_image(tree / "train" / "dog" / "new.png", COLOURS["dog"], (33, 33), "RGB")  # a new image: a new entry
    grown = load_dataset(spec(tree))
    assert len(grown.train_y) + len(grown.test_y) == 16
    assert len(list((tree / "data" / "image_folder_cache").glob("*.npz"))) == 2
    assert not list((tree / "data" / "image_folder_cache").glob("*.tmp*"))


def test_parallel_decoding_equals_one_by_one(tree):
    files, _, _ = image_folder.scan(tree / "train")
    parallel = image_folder.decode_all(files, 20, 3, workers=4)
    assert np.array_equal(parallel, np.stack([image_folder.decode(f, 20, 3) for f in files]))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: None, r"image_folder: .*train is not a directory\. Expected a folder with one subfolder of images per class"),
        (lambda root: (root / "train").mkdir(), r"holds no image PIL can read .*Expected a folder with one subfolder"),
        (lambda root: (write_class_tree(root / "train", 1), write_image(root / "train" / "x.png", (0, 0, 0), (9, 9), "RGB")), r"holds both images \(x\.png, \.\.\.\) and class subfolders with images \(cat, dog, fox, \.\.\.\): use one layout"),
        (lambda root: (write_class_tree(root / "train", 1), (root / "train" / "emu").mkdir()), r"class subfolder\(s\) \['emu'\] of .* hold no image"),
        (lambda root: (write_class_tree(root / "train", 1), (root / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG broken")), r"dog/bad\.png is not an image PIL can read"),
    ],
)
def test_missing_or_malformed_folders_name_the_path_and_the_layout(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=expected):
        load_dataset(spec(tmp_path))


def grid_yaml(tmp_path: Path, dataset: str, annotator: str = "{kind: synthetic}", axes: str = "grid: {q: [0.1], eta: [0.1]}\n") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"experiment: t\nstorage: {tmp_path / 'results'}\ndatasets:\n- {dataset}\nannotators:\n- {annotator}\n{axes}"
        "training: {batch_size: 4}\nmethods:\n- {name: cc}\n"
    )
    return path


def test_dry_run_accepts_a_tree_and_refuses_what_cannot_run(tree, tmp_path, capsys):
    from orchestrator.sweep import main

    ok = grid_yaml(tmp_path, f"{{name: image_folder, path: {tree / 'train'}, root: {tree / 'data'}, image_size: 16}}")
    assert main([str(ok), "--dry-run"]) == 0
    capsys.readouterr()
    missing = grid_yaml(tmp_path, f"{{name: image_folder, path: {tmp_path / 'nowhere'}}}")
    assert main([str(missing), "--dry-run"]) == 2
    assert f"image_folder: {tmp_path / 'nowhere'} is not a directory. Expected a folder with one subfolder" in capsys.readouterr().err
    write_image(tmp_path / "flat" / "a.png", (1, 2, 3), (20, 20), "RGB")
    flat = grid_yaml(tmp_path, f"{{name: image_folder, path: {tmp_path / 'flat'}, root: {tree / 'data'}, class_names: [cat, dog]}}")
    assert main([str(flat), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "kind synthetic): datasets[0] (flat) is a flat folder of unlabeled images; only a VLM annotator" in err
    assert "training on unlabeled images" not in err  # trials train on them with label-free metrics
    assert "Traceback" not in err


def test_grid_options_of_image_folder():
    g = parse_grid({"experiment": "t", "datasets": [{"name": "image_folder", "path": "/photos/train", "image_size": 64, "channels": 1}],
                    "annotators": [{"kind": "clip"}], "methods": [{"name": "cc"}]})  # fmt: skip
    assert g.datasets[0].display == "train" and g.datasets[0].image_size == 64


def test_a_trial_trains_on_the_folder_from_the_cache(tree, monkeypatch, one_thread):
    """The driver decodes once; the trial reads the cache (decoding is refused inside it)."""
    from orchestrator.plan import expand
    from trainables.loop import run_trial

    g = parse_grid({
        "experiment": "t", "storage": str(tree / "results"),
        "datasets": [{"name": "image_folder", "path": str(tree / "train"), "root": str(tree / "data"), "image_size": 16}],
        "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.0]},
        "training": {"epochs": 2, "batch_size": 4, "backbone": "small_cnn"}, "methods": [{"name": "cc"}],
    })  # fmt: skip
    study = expand(g)[0]
    ds = load_dataset(study.cell.dataset)
    ann = annotate(ds, study.cell.annotator, q=0.3, eta=0.0, cache_dir=tree / "ann")
    assert ann.stats["partial_acc"] == 1.0 and 1.0 <= ann.stats["mean_set_size"] <= 3.0
    monkeypatch.setattr(image_folder, "decode_all", lambda *a, **k: pytest.fail("a trial decoded the images again"))
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tree / "ann"), cpus=1, device="cpu")
    out: list[dict] = []
    run_trial(config, lambda metrics, save: out.append(dict(metrics)))
    assert len(out) == 2 and 0.0 <= out[-1]["test/acc"] <= 1.0 and np.isfinite(out[-1]["train/loss"])


def test_a_trial_trains_on_unlabeled_images_with_label_free_metrics_only(tmp_path, monkeypatch, one_thread):
    """A flat folder annotated by a VLM (its per-template probabilities hand-made here): every epoch
    reports the label-free objective and the loss, and no metric that would need a label."""
    from orchestrator.annotation import clip as clip_mod
    from orchestrator.plan import expand
    from trainables.loop import run_trial

    for i in range(12):
        write_image(tmp_path / "flat" / f"{i}.png", (20 * i, 100, 200 - 10 * i), (20 + i, 18), "RGB")
    g = parse_grid({
        "experiment": "t", "storage": str(tmp_path / "results"),
        "datasets": [{"name": "image_folder", "path": str(tmp_path / "flat"), "root": str(tmp_path / "data"),
                      "class_names": ["cat", "dog"], "image_size": 16}],
        "annotators": [{"kind": "clip", "pretrained": None, "templates": ["a photo of a {}", "a {}"],
                        "model_config_path": str(Path(__file__).parent / "fixtures" / "tiny_clip.json")}],
        "training": {"epochs": 2, "batch_size": 4, "backbone": "small_cnn"}, "methods": [{"name": "coreg", "params": {"warmup_epochs": 1}}],
    })  # fmt: skip
    study = expand(g)[0]
    ds = load_dataset(study.cell.dataset)
    assert not ds.labeled and len(ds.test_x) == 0
    probs = np.random.default_rng(0).dirichlet(np.ones(2), size=(len(ds.train_x), 2)).astype(np.float16)  # (N, T, C)
    monkeypatch.setattr(clip_mod, "annotate_clip", lambda d, spec, names, progress=None: (probs, probs[:0]))
    ann = annotate(ds, study.cell.annotator, cache_dir=tmp_path / "ann")
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp_path / "ann"), cpus=1, device="cpu")
    out: list[dict] = []
    run_trial(config, lambda metrics, save: out.append(dict(metrics)) or (save and save(tmp_path)))
    assert len(out) == 2 and all(np.isfinite(m["train/loss"]) and 0.0 <= m["val/covering_rate"] <= 1.0 for m in out)
    needs_labels = ("test/", "pl/acc", "split/precision", "split/recall")
    assert not [k for m in out for k in m if k.startswith(needs_labels)]
    assert out[-1]["split/size"] >= 0 and (tmp_path / "state.pt").is_file() and not (tmp_path / "predictions.npz").exists()


def test_tables_say_no_labels_for_unlabeled_images_instead_of_a_number():
    """Trial runs of a flat folder report the label-free objective and no test accuracy: their
    column says so (with the objective of the run chosen per seed), never a made-up accuracy."""
    from types import SimpleNamespace

    from orchestrator import report

    def run(run_id, dataset, seed, metrics):
        tags = {"method": "cc", "dataset": dataset, "annotator": "clip", "seed": str(seed), "split": "", "q": "", "eta": "",
                "shots": "0", "fraction": "1", "objective": "val/covering_rate"}  # fmt: skip
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="FINISHED"), data=SimpleNamespace(tags=tags, metrics=metrics))

    trials = [
        run("u0", "photos", 0, {"val/covering_rate": 0.80}),
        run("u0b", "photos", 0, {"val/covering_rate": 0.70}),  # not chosen: lower objective
        run("u1", "photos", 1, {"val/covering_rate": 0.90}),
        run("l0", "digits", 0, {"test/acc": 0.5, "test/acc_selected": 0.5, "val/covering_rate": 0.9}),
    ]
    tables, flags = report.build(trials, [])
    text = tables.markdown()
    assert "no labels (val/covering_rate 0.850)" in text and "50.00 (n=1)" in text
    assert flags == {"u0": True, "u0b": False, "u1": True, "l0": True}
    assert "no labels" in tables.html("t")
