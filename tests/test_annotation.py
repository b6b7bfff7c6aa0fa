"""Annotation: the flip generator, candidate modes, the cached stage and its keys (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.annotation import candidates as cands
from orchestrator.annotation.stage import annotate, annotation_key, clip_probs_key
from orchestrator.annotation.synthetic import flip_candidates
from orchestrator.annotation.templates import OPENAI_TEMPLATES, PAPER_TEMPLATES, templates_for
from orchestrator.config import ClipAnnotatorSpec, DatasetSpec, SyntheticAnnotatorSpec
from trainables.data.annotation import Annotation, CorruptEntryError, checksum, load_cached, write_entry
from trainables.data.datasets import load_dataset

FIXTURES = Path(__file__).parent / "fixtures"

# ------------------------------------------------------------------------------------ templates


def test_template_sets():
    assert len(PAPER_TEMPLATES) == 27 and PAPER_TEMPLATES[0] == "a photo of a {}"
    assert PAPER_TEMPLATES[-1] == "a photo of a small {}"
    assert len(set(PAPER_TEMPLATES)) == 27
    assert templates_for("paper27") == list(PAPER_TEMPLATES)
    assert templates_for(["x {} y"]) == ["x {} y"]
    with pytest.raises(ValueError, match="unknown template set"):
        templates_for("paper28")


def test_openai_templates_match_open_clip():
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    assert len(OPENAI_TEMPLATES) == 80
    assert [t.format("cat") for t in OPENAI_TEMPLATES] == [f("cat") for f in OPENAI_IMAGENET_TEMPLATES]
    assert templates_for("openai80")[39] == "a photo of a {}."


# ------------------------------------------------------------------------------- flip generator


N, C = 200_000, 10


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(123).integers(0, C, N)


def _sigma(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("q, eta", [(0.3, 0.2), (0.1, 0.3), (0.5, 0.1)])
def test_flip_statistics(labels, q, eta):
    cand = flip_candidates(labels, C, q, eta, np.random.default_rng(0))
    assert cand.shape == (N, C) and cand.dtype == bool
    in_set = cand[np.arange(N), labels]
    expected_eta = eta * (1 - q ** (C - 1))  # a full set cannot be flipped
    assert abs((1 - in_set.mean()) - expected_eta) < 5 * _sigma(eta, N)
    size_sd = (q * (1 - q) * (C - 1)) ** 0.5
    assert abs(cand.sum(1).mean() - (1 + q * (C - 1))) < 5 * size_sd / N**0.5
    assert cand.sum(1).min() >= 1


def test_flip_swaps_the_true_label_for_one_outside_label(labels):
    # Same seed with and without noise: the eta=0 sets are the sets before flipping.
    q, eta = 0.3, 0.25
    base = flip_candidates(labels, C, q, 0.0, np.random.default_rng(7))
    noisy = flip_candidates(labels, C, q, eta, np.random.default_rng(7))
    assert base[np.arange(N), labels].all()
    changed = (base != noisy).any(axis=1)
    assert abs(changed.mean() - eta) < 5 * _sigma(eta, N)
    in_set = noisy[np.arange(N), labels]
    assert np.array_equal(in_set, ~changed)  # true label in S iff not flipped
    assert np.array_equal(noisy.sum(1), base.sum(1))  # set size unchanged
    added = noisy & ~base
    removed = base & ~noisy
    assert np.all(added[changed].sum(1) == 1) and np.all(removed[changed].sum(1) == 1)
    assert np.all(removed[changed].argmax(1) == labels[changed])


def test_flip_new_label_is_uniform_outside_the_set():
    n = 90_000
    cand = flip_candidates(np.zeros(n, dtype=np.int64), C, 0.0, 1.0, np.random.default_rng(1))
    assert not cand[:, 0].any() and np.all(cand.sum(1) == 1)
    counts = np.bincount(cand.argmax(1), minlength=C)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - n / 9) < 5 * (n * (1 / 9) * (8 / 9)) ** 0.5)


def test_flip_edge_cases(labels):
    clean = flip_candidates(labels[:1000], C, 0.0, 0.0, np.random.default_rng(0))
    assert np.array_equal(clean, np.eye(C, dtype=bool)[labels[:1000]])
    full = flip_candidates(labels[:1000], C, 1.0, 0.9, np.random.default_rng(0))
    assert full.all()  # nothing outside a full set: no flip
    a = flip_candidates(labels[:1000], C, 0.2, 0.2, np.random.default_rng(5))
    b = flip_candidates(labels[:1000], C, 0.2, 0.2, np.random.default_rng(5))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="outside"):
        flip_candidates(np.array([0, C]), C, 0.1, 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="q = 1.5"):
        flip_candidates(labels[:10], C, 1.5, 0.1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------- candidates

# 3 samples x 3 templates x 4 classes, with the expected answers worked out by hand.
PROBS = np.array(
    [
        [[0.70, 0.20, 0.05, 0.05], [0.30, 0.40, 0.20, 0.10], [0.60, 0.10, 0.20, 0.10]],
        [[0.10, 0.15, 0.05, 0.70], [0.10, 0.15, 0.05, 0.70], [0.10, 0.15, 0.05, 0.70]],
        [[0.25, 0.25, 0.40, 0.10], [0.10, 0.20, 0.30, 0.40], [0.50, 0.30, 0.10, 0.10]],
    ],
    dtype=np.float16,
)
# template averages: [.533 .233 .150 .083], [.10 .15 .05 .70], [.283 .250 .267 .200]


def _sets(*members):
    out = np.zeros((len(members), 4), dtype=bool)
    for i, m in enumerate(members):
        out[i, list(m)] = True
    return out


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("multi_prompt", {}, _sets({0, 1}, {3}, {0, 2, 3})),
        ("top_k", {"top_k": 2}, _sets({0, 1}, {1, 3}, {0, 2})),
        ("top_k", {"top_k": 1}, _sets({0}, {3}, {0})),
        ("prob_ratio", {"prob_ratio": 0.5}, _sets({0}, {3}, {0, 1, 2, 3})),
        ("prob_ratio", {"prob_ratio": 0.25}, _sets({0, 1, 2}, {3}, {0, 1, 2, 3})),
        ("prob_ratio", {"prob_ratio": 0.9}, _sets({0}, {3}, {0, 2})),
        ("prob_ratio", {"prob_ratio": 0.1}, _sets({0, 1, 2, 3}, {0, 1, 3}, {0, 1, 2, 3})),
    ],
)
def test_candidate_modes(mode, kwargs, expected):
    assert np.array_equal(cands.candidates(PROBS, mode, **kwargs), expected)


def test_single_average_and_soft_labels():
    assert cands.single_labels(PROBS, 0).tolist() == [0, 3, 2]
    assert cands.single_labels(PROBS, 1).tolist() == [1, 3, 3]
    assert cands.average_labels(PROBS).tolist() == [0, 3, 0]
    soft = cands.soft_labels(PROBS)
    assert soft.dtype == np.float32 and np.allclose(soft.sum(1), 1.0)
    assert np.allclose(soft[0], [1.6 / 3, 0.7 / 3, 0.45 / 3, 0.25 / 3], atol=1e-3)


def test_candidate_errors():
    with pytest.raises(ValueError, match="unknown candidate mode"):
        cands.candidates(PROBS, "kd")
    with pytest.raises(ValueError, match="top_k = 5"):
        cands.candidates(PROBS, "top_k", top_k=5)
    with pytest.raises(ValueError, match="template_index = 3"):
        cands.single_labels(PROBS, 3)
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        cands.candidates(PROBS[0], "multi_prompt")


# ------------------------------------------------------------------------------------- stage


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits"))


SYNTH = SyntheticAnnotatorSpec(kind="synthetic")
TINY = ClipAnnotatorSpec(kind="clip", pretrained=None, model_config_path=str(FIXTURES / "tiny_clip.json"))


def test_synthetic_annotation_is_cached(digits, tmp_path):
    first = annotate(digits, SYNTH, q=0.3, eta=0.2, seed=1, cache_dir=tmp_path)
    second = annotate(digits, SYNTH, q=0.3, eta=0.2, seed=1, cache_dir=tmp_path)
    assert not first.cached and second.cached
    assert second.key == first.key
    assert np.array_equal(first.cand_train, second.cand_train) and second.cand_train.dtype == bool
    assert second.stats == first.stats
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no leftovers of the atomic write
    meta = json.loads((tmp_path / first.key / "meta.json").read_text())
    assert meta["q"] == 0.3 and meta["eta"] == 0.2 and meta["seed"] == 1
    reread = load_cached(tmp_path, first.key)
    assert reread.cached and np.array_equal(reread.cand_train, first.cand_train)


def test_synthetic_stats_and_targets(digits, tmp_path):
    ann = annotate(digits, SYNTH, q=0.3, eta=0.2, seed=0, cache_dir=tmp_path)
    y = digits.train_y
    assert ann.cand_train.shape == (len(y), 10)
    partial = ann.cand_train[np.arange(len(y)), y].mean()
    assert ann.stats["partial_acc"] == pytest.approx(partial)
    assert ann.stats["eta_realised"] == pytest.approx(1 - partial)
    assert ann.stats["mean_set_size"] == pytest.approx(ann.cand_train.sum(1).mean())
    assert ann.stats["num_train"] == len(y) and ann.stats["num_test"] == len(digits.test_y)
    assert all(isinstance(v, float) for v in ann.stats.values())
    assert abs(ann.stats["eta_realised"] - 0.2) < 5 * _sigma(0.2, len(y))
    t = ann.label_sets("cand")
    assert t.dtype == np.float32 and np.array_equal(t, ann.cand_train)
    for kind in ("noisy_label", "noisy_label_avg", "soft"):
        with pytest.raises(ValueError, match="only a VLM annotator"):
            ann.label_sets(kind)
    with pytest.raises(ValueError, match="'labels' is not a valid Target"):
        ann.label_sets("labels")

    clean = annotate(digits, SYNTH, q=0.0, eta=0.0, seed=0, cache_dir=tmp_path)
    assert clean.stats["partial_acc"] == 1.0 and clean.stats["mean_set_size"] == 1.0
    assert np.array_equal(clean.cand_train, np.eye(10, dtype=bool)[y])


def test_targets_of_labels_and_soft():
    ann = Annotation(
        key="k",
        cached=False,
        cand_train=np.array([[1, 1, 0], [0, 0, 1]], dtype=bool),
        noisy_label=np.array([1, 2]),
        noisy_label_avg=np.array([0, 2]),
        soft_train=np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32),
    )
    assert ann.label_sets("noisy_label").tolist() == [[0, 1, 0], [0, 0, 1]]
    assert ann.label_sets("noisy_label_avg").tolist() == [[1, 0, 0], [0, 0, 1]]
    assert ann.label_sets("soft").tolist() == [[1, 0, 0], [0, 0, 1]]  # the probabilities' argmax
    soft = ann.soft_targets("soft")
    assert soft.dtype == np.float32 and soft[1, 2] == pytest.approx(0.8)


def test_concurrent_writer_keeps_the_first_entry(tmp_path):
    final = tmp_path / "key"
    write_entry(final, {"a": np.arange(3)}, {"who": "first"})
    write_entry(final, {"a": np.arange(4)}, {"who": "second"})  # lost the race: no error
    meta = json.loads((final / "meta.json").read_text())
    assert meta["who"] == "first" and meta["checksums"] == {"a": checksum(np.arange(3))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_load_cached_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        load_cached(tmp_path, "0123")


def test_synthetic_key_depends_on_every_input(digits):
    base = annotation_key(digits, SYNTH, q=0.3, eta=0.2, seed=0)
    assert annotation_key(digits, SYNTH, q=0.3, eta=0.2, seed=0) == base
    other_data = load_dataset(DatasetSpec(name="digits", subsample=300))
    changed = [
        annotation_key(digits, SYNTH, q=0.1, eta=0.2, seed=0),
        annotation_key(digits, SYNTH, q=0.3, eta=0.1, seed=0),
        annotation_key(digits, SYNTH, q=0.3, eta=0.2, seed=1),
        annotation_key(other_data, SYNTH, q=0.3, eta=0.2, seed=0),
    ]
    assert len({base, *changed}) == 5
    # The annotator's display name is a label, not content.
    assert annotation_key(digits, SYNTH.model_copy(update={"name": "flip"}), q=0.3, eta=0.2, seed=0) == base


def test_synthetic_needs_q_and_eta_and_clip_refuses_them(digits, tmp_path):
    with pytest.raises(ValueError, match="needs q and eta"):
        annotation_key(digits, SYNTH, q=0.3)
    with pytest.raises(ValueError, match="apply only to synthetic"):
        annotation_key(digits, TINY, q=0.3, eta=0.1)


def test_clip_key_depends_on_what_determines_the_probabilities(digits, tmp_path):
    base = annotation_key(digits, TINY, seed=0)
    probs = clip_probs_key(digits, TINY)
    # CLIP is deterministic: the seed is not part of its key; nor are batch size or resources.
    assert annotation_key(digits, TINY, seed=5) == base
    same = TINY.model_copy(update={"batch_size": 7, "num_actors": 3, "gpus_per_actor": 0.5, "name": "other"})
    assert annotation_key(digits, same) == base
    assert annotation_key(digits, TINY.model_copy(update={"top_k": 5})) == base  # unused in multi_prompt mode

    other_config = tmp_path / "tiny_clip.json"  # same name, different architecture
    cfg = json.loads((FIXTURES / "tiny_clip.json").read_text())
    cfg["vision_cfg"]["layers"] = 3
    other_config.write_text(json.dumps(cfg))
    ckpt_a, ckpt_b = tmp_path / "a.pt", tmp_path / "b.pt"
    ckpt_a.write_bytes(b"weights a")
    ckpt_b.write_bytes(b"weights b")
    variants = {
        "templates": TINY.model_copy(update={"templates": "openai80"}),
        "template list": TINY.model_copy(update={"templates": ["a {}"]}),
        "class names": TINY.model_copy(update={"class_names": [f"digit {i}" for i in range(10)]}),
        "model": ClipAnnotatorSpec(kind="clip", model="RN50", pretrained=None),
        "model config": TINY.model_copy(update={"model_config_path": str(other_config)}),
        "weights tag": ClipAnnotatorSpec(kind="clip", model="RN50", pretrained="openai"),
        "weights file a": TINY.model_copy(update={"pretrained": str(ckpt_a)}),
        "weights file b": TINY.model_copy(update={"pretrained": str(ckpt_b)}),
        "logit scale": TINY.model_copy(update={"logit_scale": 50.0}),
        "precision": TINY.model_copy(update={"precision": "bf16"}),
    }
    probs_keys = {name: clip_probs_key(digits, spec) for name, spec in variants.items()}
    assert len({probs, *probs_keys.values()}) == len(variants) + 1, probs_keys
    assert clip_probs_key(load_dataset(DatasetSpec(name="digits", test_subsample=100)), TINY) != probs

    # Candidate options change the annotation but not the probabilities it is derived from.
    modes = [
        TINY.model_copy(update={"candidate_mode": "top_k", "top_k": 2}),
        TINY.model_copy(update={"candidate_mode": "top_k", "top_k": 3}),
        TINY.model_copy(update={"candidate_mode": "prob_ratio", "prob_ratio": 0.5}),
        TINY.model_copy(update={"single_template": 3}),
    ]
    assert len({base, *(annotation_key(digits, m) for m in modes)}) == len(modes) + 1
    assert all(clip_probs_key(digits, m) == probs for m in modes)


def test_clip_class_names_must_match_the_classes(digits):
    with pytest.raises(ValueError, match="class_names has 3 entries but digits has 10 classes"):
        clip_probs_key(digits, TINY.model_copy(update={"class_names": ["a", "b", "c"]}))


# -- cache integrity ----------------------------------------------------------------------------


def _tamper(entry: Path, how: str) -> None:
    arrays = dict(np.load(entry / "arrays.npz"))
    if how == "altered":  # every label a candidate: the best possible label-free objective, no information
        arrays["cand_train"] = np.ones_like(arrays["cand_train"])
        np.savez(entry / "arrays.npz", **arrays)
    elif how == "truncated":
        data = (entry / "arrays.npz").read_bytes()
        (entry / "arrays.npz").write_bytes(data[: len(data) // 2])
    else:
        (entry / "meta.json").write_text("{not json")


@pytest.mark.parametrize("how", ["altered", "truncated", "meta"])
def test_a_corrupt_cache_entry_is_refused_moved_aside_and_rebuilt(digits, tmp_path, how):
    spec = SyntheticAnnotatorSpec(kind="synthetic")
    first = annotate(digits, spec, q=0.3, eta=0.3, seed=0, cache_dir=tmp_path)
    entry = tmp_path / first.key
    _tamper(entry, how)
    with pytest.raises(CorruptEntryError, match=first.key):
        load_cached(tmp_path, first.key)  # what a trial reads: refused, never used
    with pytest.warns(UserWarning, match="moved aside"):
        again = annotate(digits, spec, q=0.3, eta=0.3, seed=0, cache_dir=tmp_path)
    assert not again.cached and np.array_equal(again.cand_train, first.cand_train)
    assert again.stats == first.stats
    assert len(list(tmp_path.glob(f"{first.key}.corrupt-*"))) == 1  # kept for inspection
    assert load_cached(tmp_path, first.key).cached  # the rebuilt entry reads back


def test_corrupt_vlm_probabilities_are_computed_again(digits, tmp_path, monkeypatch):
    from orchestrator.annotation import clip as clip_mod

    calls = []

    def fake_model(ds, spec, names, progress=None):  # stands in for the CLIP actors
        calls.append(1)
        rng = np.random.default_rng(0)
        return tuple(rng.dirichlet(np.ones(10), (len(y), 27)).astype(np.float16) for y in (ds.train_y, ds.test_y))

    monkeypatch.setattr(clip_mod, "annotate_clip", fake_model)
    first = annotate(digits, TINY, cache_dir=tmp_path)
    probs_entry = tmp_path / "clip_probs" / first.meta["probs_key"]
    _tamper(probs_entry, "truncated")
    with pytest.warns(UserWarning, match="moved aside"):
        again = annotate(digits, TINY, cache_dir=tmp_path)
    assert len(calls) == 2 and np.array_equal(again.probs_train, first.probs_train)
