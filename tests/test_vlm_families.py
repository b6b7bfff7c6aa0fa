"""The ``vlm`` annotator on other image-text-to-text families than LLaVA: a tiny random PaliGemma
(SigLIP + Gemma; its processor has no chat template, writes the prompt itself and returns
``token_type_ids``), a tiny random Qwen2-VL (image grid, ``<|image_pad|>`` tokens, multimodal
rotary positions, ChatML chat template) and a tiny random Idefics3 (SmolVLM-Instruct's
architecture: each image cut into tiles plus a global view, (B, tiles, C, H, W) pixels with a
``pixel_attention_mask``, ``<row_i_col_j>`` tags), built by tests/fixtures/tiny_vlm_families.py and
loaded back through ``AutoProcessor`` + ``AutoModelForImageTextToText``.

The expected values come from each family's own documented pipeline, written out here: the prompt
built the way the family's model card builds it, the family's processor called on the whole batch,
``model.generate`` and the parser (``generate``); the processor's own encoding of prompt + answer
and one forward pass per class (``score``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainables.common.answers import AnswerParser, fill_question
from orchestrator.annotation.stage import annotate
from orchestrator.annotation.templates import VLM_PAPER_TEMPLATES
from orchestrator.annotation.vlm import VlmActor, actor_kwargs
from trainables.common.vlm_model import UNPARSED, to_pil
from orchestrator.config import DatasetSpec, VlmAnnotatorSpec
from trainables.data.datasets import load_dataset

TEMPLATES = (
    VLM_PAPER_TEMPLATES[0],
    "Which of these is it: {classes}? Answer:",
    "What is shown?\n{options}\nAnswer with the letter.",
)
FAMILIES = ("paligemma", "qwen2_vl", "idefics3")
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
"""Names of one to five tokens: the score mode's continuation over several answer tokens is exercised."""


def spec(model, **kw) -> VlmAnnotatorSpec:
    fields = {"kind": "vlm", "name": "tiny", "model": str(model), "templates": TEMPLATES, "batch_size": 8,
              "num_actors": 1, "max_new_tokens": 4, **kw}  # fmt: skip
    return VlmAnnotatorSpec(**fields)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits", subsample=24, test_subsample=8))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family name, model directory)."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def actors(family, digits, one_thread):
    _, model = family
    return {
        "generate": VlmActor(**actor_kwargs(spec(model), digits.class_names)),
        "score": VlmActor(**actor_kwargs(spec(model, answer_mode="score"), FASHION)),
    }


def reference_prompt(name: str, processor, question: str) -> str:
    """The prompt as each family's model card builds it."""
    if name == "paligemma":
        assert not getattr(processor, "chat_template", None)  # PaliGemma has no conversation format
        return question  # the processor puts the image tokens and <bos> in front and a newline after
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_family_prompt_formats(family, actors, digits):
    name, _ = family
    actor = actors["score"]
    image = to_pil(digits.train_x[:1])[0]
    inputs = actor.prompt_inputs(image)[0]
    tokens = actor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    question = fill_question(TEMPLATES[0], list(FASHION))
    if name == "paligemma":
        seq = actor.processor.image_seq_length
        assert tokens[: seq + 1] == ["<image>"] * seq + ["<bos>"]
        assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}  # the prefix the model attends to both ways
        assert actor.prompts[0] == "<image>" + question
    elif name == "idefics3":
        tags = [t for t in tokens if t.startswith("<row_") or t == "<global-img>"]
        assert tags == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "<global-img>"]
        assert tokens.count("<image>") == 5 * actor.processor.image_seq_len and tokens[-2:] == ["assistant", ":"]
        batch = actor.pixels([image, image])  # as the processor nests them: one sample per image, 2x2 tiles + global each
        assert batch["pixel_values"].shape == (2, 5, 3, 16, 16) and batch["pixel_attention_mask"].shape == (2, 5, 16, 16)
    else:
        start = tokens.index("<|vision_start|>")
        assert tokens[start + 1 : start + 6] == ["<|image_pad|>"] * 4 + ["<|vision_end|>"]  # 4x4 patches merged 2x2
        assert tokens[-2:] == ["<|im_start|>", "assistant"] and "mm_token_type_ids" in inputs
    assert all(v.shape == inputs["input_ids"].shape for v in inputs.values())


def test_generate_matches_the_family_pipeline(family, actors, digits):
    name, _ = family
    actor = actors["generate"]
    x = digits.train_x[:5]
    out = actor({"index": np.arange(5), "image": x})
    raw = [json.loads(r) for r in out["raw"]]
    for t, template in enumerate(TEMPLATES):
        prompt = reference_prompt(name, actor.processor, fill_question(template, list(digits.class_names)))
        inputs = actor.processor(text=[prompt] * 5, images=to_pil(x), return_tensors="pt")
        inputs.pop("labels", None)  # PaliGemma's training labels
        ref = actor.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = actor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert [r[t] for r in raw] == [e.strip() for e in expected]
        parser = AnswerParser(tuple(digits.class_names), lettered="{options}" in template)
        assert out["answers"][:, t].tolist() == [UNPARSED if parser(r[t]) is None else parser(r[t]) for r in raw]
    assert any(r[t] for r in raw for t in range(3))  # the model said something


def _answer_logp(name: str, processor, model, prompt: str, answer: str, images) -> tuple[torch.Tensor, list[int]]:
    """(B,) log P(answer | image, prompt) by one forward pass over the processor's encoding of both."""
    b = len(images)
    if name == "paligemma":  # the answer as PaliGemma's suffix: token_type_ids 1, then <eos>
        enc = processor(text=[prompt] * b, images=images, suffix=[answer] * b, return_tensors="pt")
        enc.pop("labels")
        answer_at = torch.nonzero(enc["token_type_ids"][0]).flatten()[:-1]  # without the final <eos>
    else:  # the answer right after the generation prompt (after a space unless the prompt ends in a newline)
        enc = processor(text=[prompt + ("" if prompt.endswith("\n") else " ") + answer] * b, images=images, return_tensors="pt")
        prefix = processor(text=[prompt], images=images[:1], return_tensors="pt")["input_ids"][0]
        assert torch.equal(enc["input_ids"][0, : len(prefix)], prefix)
        answer_at = torch.arange(len(prefix), enc["input_ids"].shape[1])
    with torch.inference_mode():
        logp = model(**enc).logits.float().log_softmax(-1)
    ids = enc["input_ids"]
    picked = logp[:, answer_at - 1].gather(-1, ids[:, answer_at].unsqueeze(-1)).squeeze(-1)
    return picked.sum(-1), ids[0, answer_at].tolist()


def test_score_is_the_normalised_likelihood_of_each_class_name(family, actors, digits):
    name, _ = family
    actor = actors["score"]
    x = digits.train_x[:3]
    out = actor({"index": np.arange(3), "image": x})
    assert out["probs"].shape == (3, 3, 10) and out["probs"].dtype == np.float16
    images = to_pil(x)
    for t, template in enumerate(TEMPLATES):
        prompt = reference_prompt(name, actor.processor, fill_question(template, list(FASHION)))
        logp = torch.zeros(3, 10)
        for c, class_name in enumerate(FASHION):
            logp[:, c], tokens = _answer_logp(name, actor.processor, actor.model, prompt, class_name, images)
            assert actor.answer_ids[t][c] == tokens  # the answer tokens the family's processor gives
        np.testing.assert_allclose(out["probs"][:, t].astype(np.float32), logp.softmax(-1).numpy(), atol=2e-3)
    assert max(len(a) for a in actor.answer_ids[0]) >= 3  # "t - shirt / top": several continuation steps
    assert len({row.tobytes() for row in out["probs"].reshape(3, -1)}) == 3


@pytest.mark.ray
@pytest.mark.parametrize("name, mode", [("paligemma", "generate"), ("qwen2_vl", "score"), ("idefics3", "score")])
def test_through_ray_data(ray_session, request, name, mode, digits, tmp_path):
    """The annotation stage on a Ray Data actor pool gives what the actor gives on the whole set."""
    model = request.getfixturevalue(f"tiny_{name}_dir")
    got = annotate(digits, spec(model, answer_mode=mode), cache_dir=tmp_path)
    direct = VlmActor(**actor_kwargs(spec(model, answer_mode=mode), digits.class_names))
    everything = direct({"index": np.arange(32), "image": np.concatenate([digits.train_x, digits.test_x])})
    if mode == "generate":
        assert np.array_equal(np.concatenate([got.answers_train, got.answers_test]), everything["answers"])
        assert got.cand_train.shape == (24, 10) and "unparseable_rate_t2" in got.stats
    else:
        both = np.concatenate([got.probs_train, got.probs_test]).astype(np.float32)
        np.testing.assert_allclose(both, everything["probs"].astype(np.float32), atol=2e-3)
        assert np.array_equal(got.noisy_label, got.probs_train[:, 0].argmax(-1))


def _answer_encoding(name: str, processor, prompt: str, answer: str, image) -> tuple[dict, torch.Tensor]:
    """The family's own encoding of prompt + answer + end-of-sequence (PaliGemma: its ``suffix``,
    which ends in <eos>, token type 1), and the answer's positions in it."""
    eos = processor.tokenizer.eos_token_id
    if name == "paligemma":
        enc = processor(text=[prompt], images=[image], suffix=[answer], return_tensors="pt")
        enc.pop("labels")
        at = torch.nonzero(enc["token_type_ids"][0]).flatten()
    else:
        enc = processor(text=[prompt + ("" if prompt.endswith("\n") else " ") + answer], images=[image], return_tensors="pt")
        prefix = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([[eos]])], dim=1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones(1, 1, dtype=enc["attention_mask"].dtype)], dim=1)
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in enc:
                enc[key] = torch.cat([enc[key], torch.zeros(1, 1, dtype=enc[key].dtype)], dim=1)
        at = torch.arange(prefix, enc["input_ids"].shape[1])
    return enc, at


def _answer_nll(name: str, processor, model, prompt: str, answer: str, image) -> torch.Tensor:
    """Mean -log p of the answer's tokens and the end-of-sequence token after it, by one plain
    forward pass over the family's own encoding."""
    enc, at = _answer_encoding(name, processor, prompt, answer, image)
    with torch.no_grad():
        logp = model(**enc).logits.float().log_softmax(-1)
    return -logp[0, at - 1].gather(-1, enc["input_ids"][0, at].unsqueeze(-1)).mean()


def test_vlm_lora_learns_each_familys_answers_as_its_own_format_encodes_them(family, actors, digits):
    """``vlm_lora``'s loss on each family: the class name (several tokens) and the end-of-sequence
    token as the answer, teacher-forced, equals a plain forward pass over the family's own encoding
    (PaliGemma's suffix with its token types); the adapters sit on the language model only."""
    from trainables.common.vlm_model import VlmQuestioner
    from trainables.vlm_lora import lora_targets

    name, _ = family
    actor = actors["score"]
    targets = lora_targets(actor.model, "language_model")
    vision = {id(m) for n, m in actor.model.named_modules() if "vision" in n or "projector" in n or "connector" in n}
    assert targets and not any(id(actor.model.get_submodule(t)) in vision for t in targets)
    q = VlmQuestioner(actor.processor, actor.model, templates=TEMPLATES[:2], class_names=FASHION)
    images = to_pil(digits.train_x[:3])
    labels = torch.tensor([0, 9, 4])  # "T-shirt/top", "Ankle boot", "Coat": names of several tokens
    for t, template in enumerate(TEMPLATES[:2]):
        prompt = reference_prompt(name, actor.processor, fill_question(template, list(FASHION)))
        for image, c in zip(images, labels):
            seen: dict = {}
            hook = actor.model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
            try:
                got = q.answer_loss([image], c.view(1), t)
            finally:
                hook.remove()
            torch.testing.assert_close(got, _answer_nll(name, actor.processor, actor.model, prompt, FASHION[c], image), atol=1e-4, rtol=1e-4)
            enc, _ = _answer_encoding(name, actor.processor, prompt, FASHION[c], image)
            for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):  # the very inputs, token types too
                assert (key in enc) == (key in seen), key
                if key in enc:
                    assert torch.equal(seen[key].cpu(), enc[key]), key
