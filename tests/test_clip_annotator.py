"""The CLIP annotator on a tiny, randomly initialised open_clip model (real code path, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.annotation import clip as clip_mod
from orchestrator.annotation.clip import ClipActor, ClipLoadError, actor_kwargs, model_name_for, preprocess_images
from orchestrator.annotation.stage import annotate
from orchestrator.annotation.templates import PAPER_TEMPLATES
from orchestrator.config import ClipAnnotatorSpec, DatasetSpec
from trainables.data.datasets import load_dataset

TINY_CONFIG = Path(__file__).parent / "fixtures" / "tiny_clip.json"
SPEC = ClipAnnotatorSpec(
    kind="clip", pretrained=None, model_config_path=str(TINY_CONFIG), num_actors=2, batch_size=16, cpus_per_actor=1
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits", subsample=100, test_subsample=40))


@pytest.fixture(scope="module")
def direct_actor(digits):
    return ClipActor(**actor_kwargs(SPEC, digits.class_names))


@pytest.fixture(scope="module")
def annotated(ray_session, digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("annotations")
    calls: list[tuple[int, int]] = []
    ann = annotate(digits, SPEC, seed=0, cache_dir=cache, progress=lambda done, total: calls.append((done, total)))
    return ann, cache, calls


@pytest.mark.ray
def test_shapes_and_probabilities(annotated):
    ann, _, calls = annotated
    assert not ann.cached
    assert ann.probs_train.shape == (100, 27, 10) and ann.probs_test.shape == (40, 27, 10)
    assert ann.probs_train.dtype == np.float16
    sums = ann.probs_train.astype(np.float32).sum(-1)
    assert np.allclose(sums, 1.0, atol=1e-2)  # each template's distribution, up to fp16 rounding
    assert np.all(ann.probs_train >= 0)
    assert ann.cand_train.shape == (100, 10) and ann.cand_train.any(axis=1).all()
    assert np.all(ann.cand_train.sum(1) <= 27)
    assert calls and calls[-1] == (140, 140) and all(t == 140 for _, t in calls)


@pytest.mark.ray
def test_ray_results_are_in_index_order(annotated, digits, direct_actor):
    ann, _, _ = annotated
    images = np.concatenate([digits.train_x, digits.test_x])
    direct = direct_actor({"index": np.arange(len(images)), "image": images})
    assert np.array_equal(direct["index"], np.arange(len(images)))
    ray_probs = np.concatenate([ann.probs_train, ann.probs_test]).astype(np.float32)
    # Distinct rows, or the order check below would be vacuous.
    assert len({row.tobytes() for row in direct["probs"]}) > 100
    np.testing.assert_allclose(ray_probs, direct["probs"].astype(np.float32), atol=2e-3)


@pytest.mark.ray
def test_derived_labels_and_stats(annotated, digits):
    ann, _, _ = annotated
    per_template = ann.probs_train.argmax(-1)  # (N, T)
    union = np.zeros_like(ann.cand_train)
    for t in range(per_template.shape[1]):
        union[np.arange(100), per_template[:, t]] = True
    assert np.array_equal(ann.cand_train, union)
    assert np.array_equal(ann.noisy_label, per_template[:, 0])
    assert np.array_equal(ann.noisy_label_avg, ann.probs_train.astype(np.float32).mean(1).argmax(1))
    assert np.allclose(ann.soft_train.sum(1), 1.0, atol=1e-5)
    expected = {"partial_acc", "mean_set_size", "eta_realised", "num_train", "num_test",
                "zs_acc_train", "zs_acc_test", "zs_acc_avg_train", "zs_acc_avg_test"}  # fmt: skip
    assert set(ann.stats) == expected
    assert ann.stats["zs_acc_train"] == pytest.approx((per_template[:, 0] == digits.train_y).mean())
    assert ann.stats["zs_acc_test"] == pytest.approx((ann.probs_test[:, 0].argmax(-1) == digits.test_y).mean())
    assert ann.stats["num_test"] == 40.0
    assert ann.label_sets("noisy_label").shape == (100, 10)


@pytest.mark.ray
def test_cache_hit_and_mode_switch_reuse_the_probabilities(annotated, digits, monkeypatch):
    ann, cache, _ = annotated

    def must_not_run(*args, **kwargs):
        raise AssertionError("the CLIP model ran although its probabilities are cached")

    monkeypatch.setattr(clip_mod, "annotate_clip", must_not_run)
    again = annotate(digits, SPEC, seed=3, cache_dir=cache)  # the seed does not matter for CLIP
    assert again.cached and again.key == ann.key
    for name in ("cand_train", "noisy_label", "noisy_label_avg", "soft_train", "probs_train", "probs_test"):
        assert np.array_equal(getattr(again, name), getattr(ann, name)), name
    assert again.stats == ann.stats

    top2 = annotate(digits, SPEC.model_copy(update={"candidate_mode": "top_k", "top_k": 2}), cache_dir=cache)
    assert not top2.cached and top2.meta["probs_cached"] and top2.key != ann.key
    assert np.array_equal(top2.probs_train, ann.probs_train)
    assert np.all(top2.cand_train.sum(1) == 2)


def test_text_embeddings_are_computed_once_per_actor(direct_actor, digits):
    actor = direct_actor
    assert actor.text_encode_calls == 1
    assert actor.text_embeddings.shape == (27, 10, 32)
    assert torch.allclose(actor.text_embeddings.norm(dim=-1), torch.ones(27, 10), atol=1e-5)
    encode_text, calls = actor.model.encode_text, []
    actor.model.encode_text = lambda *a, **k: calls.append(1) or encode_text(*a, **k)
    try:
        for start in (0, 16, 32):
            actor({"index": np.arange(start, start + 16), "image": digits.train_x[start : start + 16]})
    finally:
        actor.model.encode_text = encode_text
    assert calls == [] and actor.text_encode_calls == 1


def test_actor_accepts_rgb_and_keeps_the_caller_rng(direct_actor):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    out = direct_actor({"index": np.arange(5), "image": rgb})
    assert out["probs"].shape == (5, 27, 10) and out["probs"].dtype == np.float16
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    ClipActor(**actor_kwargs(SPEC, [f"c{i}" for i in range(3)]))  # random init must not consume our draws
    assert torch.equal(torch.rand(1), expected)


def test_random_init_is_identical_across_actors(direct_actor, digits):
    other = ClipActor(**actor_kwargs(SPEC, digits.class_names))
    for a, b in zip(direct_actor.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)


def test_preprocessing_matches_open_clip_pil_transform(direct_actor, digits):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    rng = np.random.default_rng(0)
    cases = [
        (digits.train_x[:8], direct_actor.preprocess_cfg),  # grey 8x8 -> 32, the fixture model's config
        (rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), {**direct_actor.preprocess_cfg, "size": 224}),
        (rng.integers(0, 256, (4, 3, 300, 200), dtype=np.uint8), {**direct_actor.preprocess_cfg, "size": 224}),
        (
            rng.integers(0, 256, (4, 3, 30, 50), dtype=np.uint8),
            {**direct_actor.preprocess_cfg, "resize_mode": "longest"},
        ),
        (
            rng.integers(0, 256, (4, 3, 30, 50), dtype=np.uint8),
            {**direct_actor.preprocess_cfg, "interpolation": "bilinear"},
        ),
    ]
    for images, cfg in cases:
        transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        pil = [Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)) for im in images]
        expected = torch.stack([transform(im) for im in pil])
        got = preprocess_images(torch.from_numpy(images), cfg)
        assert got.shape == expected.shape
        # PIL resamples in uint8 as we do: within 3 grey levels, in normalised units (std ~0.27).
        assert (got - expected).abs().max() < 3 / 255 / 0.26, cfg


def test_model_config_errors(tmp_path):
    assert model_name_for(SPEC) == "tiny_clip"
    assert model_name_for(ClipAnnotatorSpec(**SPEC.model_dump())) == "tiny_clip"  # round trip keeps working
    clash = ClipAnnotatorSpec(**{**SPEC.model_dump(), "model": "RN50"})
    with pytest.raises(ValueError, match="does not match model_config_path"):
        model_name_for(clash)
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match=r"needs \['vision_cfg', 'text_cfg'\]"):
        ClipActor(
            model="broken", pretrained=None, model_config_path=str(bad), templates=PAPER_TEMPLATES, class_names=["a"]
        )


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ClipActor(
            model="tiny_clip", pretrained=str(tmp_path / "missing.pt"), model_config_path=str(TINY_CONFIG),
            templates=PAPER_TEMPLATES, class_names=["a", "b"],
        )  # fmt: skip
    with pytest.raises(ClipLoadError, match="could not build open_clip model 'ViT-B-32' with pretrained='no-such-tag'"):
        ClipActor(model="ViT-B-32", pretrained="no-such-tag", templates=PAPER_TEMPLATES, class_names=["a", "b"])


def test_local_checkpoint_is_loaded(direct_actor, tmp_path, digits):
    ckpt = tmp_path / "tiny.pt"
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in direct_actor.model.state_dict().items()}
    torch.save(state, ckpt)
    loaded = ClipActor(**{**actor_kwargs(SPEC, digits.class_names), "pretrained": str(ckpt)})
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[name]), name
