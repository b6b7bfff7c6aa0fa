"""The ``vlm`` annotator on a tiny randomly initialised LLaVA (tests/fixtures/tiny_vlm.py: a CLIP
vision tower and a 2-layer Llama, saved and loaded back through transformers' auto classes): the
real generate-and-parse and score paths, directly and through Ray Data, the cache and the checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from orchestrator.annotation import vlm as vlm_mod
from trainables.common.answers import AnswerParser, fill_question
from orchestrator.annotation.stage import annotate, annotation_key, vlm_outputs_key
from orchestrator.annotation.templates import VLM_PAPER_TEMPLATES
from orchestrator.annotation.vlm import VlmActor, actor_kwargs
from trainables.common.vlm_model import UNPARSED, to_pil
from orchestrator.annotation.vlm_check import vlm_problems
from orchestrator.config import DatasetSpec, VlmAnnotatorSpec
from trainables.data.datasets import load_dataset

TEMPLATES = (
    VLM_PAPER_TEMPLATES[0],
    "Which of these is it: {classes}? Answer:",
    "What is shown?\n{options}\nAnswer with the letter.",
)


def spec(model, **kw) -> VlmAnnotatorSpec:
    fields = {"kind": "vlm", "name": "tiny_vlm", "model": str(model), "templates": TEMPLATES, "batch_size": 8,
              "num_actors": 2, "max_new_tokens": 4, **kw}  # fmt: skip
    return VlmAnnotatorSpec(**fields)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits", subsample=40, test_subsample=16))


@pytest.fixture(scope="module")
def actors(tiny_vlm_dir, digits, one_thread):
    return {
        mode: VlmActor(**actor_kwargs(spec(tiny_vlm_dir, answer_mode=mode), digits.class_names))
        for mode in ("generate", "score")
    }


def images_of(digits):
    return np.concatenate([digits.train_x, digits.test_x])


def test_generate_matches_transformers_own_pipeline_and_parses_every_answer(actors, digits):
    """Prompts tokenised once per actor give what the processor gives for every batch; each stored
    answer is the parse of its raw text."""
    actor = actors["generate"]
    x = digits.train_x[:6]
    out = actor({"index": np.arange(6), "image": x})
    raw = [json.loads(r) for r in out["raw"]]  # (B, T) strings
    for t, template in enumerate(TEMPLATES):
        prompt = actor.prompts[t]
        assert fill_question(template, list(digits.class_names)) in prompt
        inputs = actor.processor(text=[prompt] * 6, images=to_pil(x), return_tensors="pt")
        ref = actor.model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=actor.tokenizer.pad_token_id)
        expected = actor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert [r[t] for r in raw] == [e.strip() for e in expected]
        parser = AnswerParser(tuple(digits.class_names), lettered="{options}" in template)
        parsed = [UNPARSED if parser(r[t]) is None else parser(r[t]) for r in raw]
        assert out["answers"][:, t].tolist() == parsed
    assert out["answers"].dtype == np.int16 and out["answers"].shape == (6, 3)


def test_score_is_the_normalised_likelihood_of_each_class_name(actors, digits):
    """The cached two-pass scoring equals a brute-force forward of prompt + answer per class."""
    actor = actors["score"]
    x = digits.train_x[:3]
    out = actor({"index": np.arange(3), "image": x})
    assert out["probs"].shape == (3, 3, 10) and out["probs"].dtype == np.float16
    assert max(len(a) for a in actor.answer_ids[0]) >= 2  # "number 3": the second pass is exercised
    pixels = actor.processor.image_processor(to_pil(x), return_tensors="pt")["pixel_values"]
    for t in range(3):
        prompt = actor.prompt_ids(to_pil(x)[0])[t][0]
        logp = torch.zeros(3, 10)
        for c, answer in enumerate(actor.answer_ids[t]):
            ids = torch.cat([prompt, torch.tensor(answer)]).expand(3, -1)
            with torch.inference_mode():
                logits = actor.model(input_ids=ids, pixel_values=pixels).logits.float().log_softmax(-1)
            steps = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            logp[:, c] = logits[:, steps].gather(-1, ids[:, steps + 1].unsqueeze(-1)).squeeze(-1).sum(-1)
        np.testing.assert_allclose(out["probs"][:, t].astype(np.float32), logp.softmax(-1).numpy(), atol=2e-3)
    assert len({row.tobytes() for row in out["probs"].reshape(3, -1)}) == 3  # images differ, so do their scores


def test_text_side_work_is_done_once_per_actor(actors, digits):
    actor = actors["score"]
    prepared = actor.text_prepare_calls
    actor.processor.apply_chat_template = lambda *a, **k: pytest.fail("a prompt was rebuilt per batch")
    actor._answer_ids = lambda *a, **k: pytest.fail("the class-name token table was rebuilt per batch")
    try:
        for start in (0, 8, 16):
            actor({"index": np.arange(8), "image": digits.train_x[start : start + 8]})
    finally:
        del actor.processor.apply_chat_template, actor._answer_ids
    assert actor.text_prepare_calls == prepared == 1


@pytest.fixture(scope="module")
def through_ray(ray_session, tiny_vlm_dir, digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("annotations")
    calls: list[tuple[int, int]] = []
    gen = annotate(digits, spec(tiny_vlm_dir), cache_dir=cache, progress=lambda d, t: calls.append((d, t)))
    score = annotate(digits, spec(tiny_vlm_dir, answer_mode="score"), cache_dir=cache)
    return gen, score, cache, calls


@pytest.mark.ray
def test_generate_through_ray_data(through_ray, actors, digits):
    gen, _, _, calls = through_ray
    assert gen.answers_train.shape == (40, 3) and gen.answers_test.shape == (16, 3)
    direct = actors["generate"]({"index": np.arange(56), "image": images_of(digits)})
    assert np.array_equal(np.concatenate([gen.answers_train, gen.answers_test]), direct["answers"])  # sample order kept
    union = np.zeros((40, 10), dtype=bool)
    for t in range(3):
        ok = gen.answers_train[:, t] != UNPARSED
        union[np.flatnonzero(ok), gen.answers_train[ok, t]] = True
    union[~union.any(1)] = True
    assert np.array_equal(gen.cand_train, union)
    both = np.concatenate([gen.answers_train, gen.answers_test])
    assert gen.stats["unparseable_rate"] == pytest.approx((both == UNPARSED).mean())
    for t in range(3):
        assert gen.stats[f"unparseable_rate_t{t}"] == pytest.approx((both[:, t] == UNPARSED).mean())
    assert gen.stats["zs_acc_test"] == pytest.approx((gen.answers_test[:, 0] == digits.test_y).mean())
    sample = gen.meta["raw_answers"]
    assert {s["template"] for s in sample} == {0, 1, 2} and all(isinstance(s["answer"], str) for s in sample)
    assert all(s["parsed"] == gen.answers_train[s["index"], s["template"]] for s in sample)
    assert gen.noisy_label is None and gen.probs_train is None  # candidate sets only
    assert calls[-1] == (56, 56)


@pytest.mark.ray
def test_score_through_ray_data_gives_clip_like_records(through_ray, actors, digits):
    _, score, _, _ = through_ray
    direct = actors["score"]({"index": np.arange(56), "image": images_of(digits)})
    np.testing.assert_allclose(
        np.concatenate([score.probs_train, score.probs_test]).astype(np.float32), direct["probs"].astype(np.float32), atol=2e-3
    )
    per_template = score.probs_train.argmax(-1)
    assert np.array_equal(score.noisy_label, per_template[:, 0])
    assert score.cand_train.sum(1).max() <= 3 and score.cand_train[np.arange(40), per_template[:, 1]].all()
    assert score.soft_train.shape == (40, 10) and np.allclose(score.soft_train.sum(1), 1, atol=1e-5)
    assert score.stats["zs_acc_test"] == pytest.approx((score.probs_test[:, 0].argmax(-1) == digits.test_y).mean())
    assert "unparseable_rate" not in score.stats


@pytest.mark.ray
def test_cache_hits_and_candidate_options_reuse_the_outputs(through_ray, tiny_vlm_dir, digits, monkeypatch):
    gen, score, cache, _ = through_ray
    monkeypatch.setattr(vlm_mod, "annotate_vlm", lambda *a, **k: pytest.fail("the VLM ran although its outputs are cached"))
    again = annotate(digits, spec(tiny_vlm_dir, num_actors=1, batch_size=4), cache_dir=cache)  # resources are not in the key
    assert again.cached and again.key == gen.key and np.array_equal(again.answers_train, gen.answers_train)
    assert again.stats == gen.stats
    top2 = annotate(digits, spec(tiny_vlm_dir, answer_mode="score", candidate_mode="top_k", top_k=2), cache_dir=cache)
    assert not top2.cached and top2.meta["probs_cached"] and top2.key != score.key
    assert np.all(top2.cand_train.sum(1) == 2)


def test_cache_key_follows_content(tiny_vlm_dir, digits, tmp_path):
    base = spec(tiny_vlm_dir)
    key = vlm_outputs_key(digits, base)
    assert vlm_outputs_key(digits, spec(tiny_vlm_dir, max_new_tokens=5)) != key
    assert vlm_outputs_key(digits, spec(tiny_vlm_dir, precision="bf16")) != key
    assert vlm_outputs_key(digits, spec(tiny_vlm_dir, templates=TEMPLATES[:2])) != key
    assert vlm_outputs_key(digits, spec(tiny_vlm_dir, batch_size=2, num_actors=1)) == key
    assert annotation_key(digits, spec(tiny_vlm_dir, single_template=1)) != annotation_key(digits, base)
    copy = shutil.copytree(tiny_vlm_dir, tmp_path / "copy")
    assert vlm_outputs_key(digits, spec(copy)) == key  # a local model is identified by content, not path
    cfg = json.loads((copy / "processor_config.json").read_text())
    (copy / "processor_config.json").write_text(json.dumps({**cfg, "patch_size": cfg.get("patch_size", 8)}, indent=1))
    assert vlm_outputs_key(digits, spec(copy)) != key  # any file of the directory counts (processor config)
    hub = spec("llava-hf/llava-1.5-7b-hf")
    assert vlm_outputs_key(digits, hub) != vlm_outputs_key(digits, spec("llava-hf/llava-1.5-7b-hf", revision="abc"))


def test_model_files_are_checked_before_ray(tiny_vlm_dir, digits, tmp_path):
    assert vlm_problems("annotators[0]", spec(tiny_vlm_dir), [digits]) == []
    copy = shutil.copytree(tiny_vlm_dir, tmp_path / "partial")
    (copy / "tokenizer.json").unlink()
    (copy / "model.safetensors").unlink()
    problems = vlm_problems("annotators[0]", spec(copy), [digits])
    assert any("has no weights" in p and "*.safetensors" in p for p in problems), problems
    assert any("has no tokenizer (tokenizer.json" in p for p in problems), problems
    assert vlm_problems("annotators[0]", spec(tmp_path / "absent"), []) == [f"annotators[0].model: no such model directory {tmp_path / 'absent'}"]
    names = vlm_problems("annotators[0]", spec(tiny_vlm_dir, class_names=("a", "b")), [digits])
    assert names == ["annotators[0].class_names: 2 names but digits has 10 classes"]


def test_hub_model_offline_is_named(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (problem,) = vlm_problems("annotators[1]", spec("llava-hf/llava-1.5-7b-hf"), [])
    assert problem.startswith("annotators[1].model: hub model 'llava-hf/llava-1.5-7b-hf' is not in the local Hugging Face cache")
    assert "config.json" in problem and "HF_HUB_OFFLINE" in problem


def test_missing_model_directory_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VlmActor(model=str(tmp_path / "nothing"), templates=TEMPLATES, class_names=["a", "b"])


def test_precision_casts_the_model_and_keeps_scores_close(actors, tiny_vlm_dir, digits):
    bf16 = VlmActor(**actor_kwargs(spec(tiny_vlm_dir, answer_mode="score", precision="bf16"), digits.class_names))
    assert bf16.model.dtype == torch.bfloat16
    x = {"index": np.arange(4), "image": digits.train_x[:4]}
    low, full = bf16(x)["probs"].astype(np.float32), actors["score"](x)["probs"].astype(np.float32)
    assert np.allclose(low.sum(-1), 1.0, atol=1e-2) and np.abs(low - full).max() < 0.05


@pytest.mark.ray
def test_clip_plus_vlm_ensemble_through_ray(through_ray, tiny_vlm_dir, digits, monkeypatch):
    """A CLIP + LLaVA ensemble: the VLM member comes from the cache (not run again), the tiny CLIP
    member runs on Ray Data, the sets are the union of the members'."""
    from pathlib import Path

    from orchestrator.config import EnsembleAnnotatorSpec

    _, score, cache, _ = through_ray
    tiny_clip = {"kind": "clip", "name": "tiny_clip", "pretrained": None, "batch_size": 64,
                 "model_config_path": str(Path(__file__).parent / "fixtures" / "tiny_clip.json"), "templates": ["a photo of a {}"]}  # fmt: skip
    members = [tiny_clip, spec(tiny_vlm_dir, answer_mode="score").model_dump()]
    monkeypatch.setattr(vlm_mod, "annotate_vlm", lambda *a, **k: pytest.fail("the cached VLM member ran again"))
    both = annotate(digits, EnsembleAnnotatorSpec(kind="ensemble", members=members), cache_dir=cache)
    clip = annotate(digits, EnsembleAnnotatorSpec(kind="ensemble", members=members).members[0], cache_dir=cache)
    assert clip.cached and np.array_equal(both.cand_train, clip.cand_train | score.cand_train)
    assert both.probs_test.shape == (16, 2, 10) and "zs_acc_avg_test" in both.stats
