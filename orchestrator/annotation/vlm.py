"""The image-text-to-text (LLaVA-style) annotator: transformers' auto classes on a Ray Data actor pool.

Co-Reg (extended paper, section III) asks LLaVA-1.5 one question per prompt template, each listing
every class name as a choice, in the model's conversation format, maps each answer to a class and
takes the union over templates as the candidate set. :class:`VlmActor` loads any model that
``AutoProcessor`` + ``AutoModelForImageTextToText`` load (a hub id or a local directory) and
answers a batch of images under every template in one of two modes:

- ``generate``: greedy decoding of at most ``max_new_tokens`` tokens; the answer is parsed back to a
  class by :mod:`orchestrator.annotation.answers` (-1 when it names no class or several).
- ``score``: the probability of each class name as the whole answer,
  p_t(c) = P(name_c | image, question_t) / sum_c' P(name_c' | image, question_t), with
  P(name | ...) the product of its tokens' conditional probabilities. One forward pass over the
  image and the question gives the first answer token's distribution and a KV cache; each class
  name of more than one token then costs a short pass over its remaining tokens on that cache,
  which is cropped back to the prompt afterwards (memory stays that of one prompt's cache, whatever
  the number of classes). The per-template probabilities are stored like CLIP's, so every candidate mode,
  noisy label, soft label and zero-shot statistic derives from them.

Text-side work is done once per actor: the questions are built with the processor's chat template
(``apply_chat_template``, generation prompt added) or, for a processor without one (PaliGemma), as
the raw question after the image token, which such a processor formats itself; each is run once
through the processor per image size (every image of a data set has the same size), which expands
the image placeholder and gives every text-side input the family needs (``input_ids``,
``attention_mask``, PaliGemma's ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids``); the class
names' answer tokens (the tokens a name adds after the text the processor really tokenises, its own
additions included: PaliGemma's newline) are tabled per template. Per batch only the image processor
(its outputs whatever their shape: Qwen2-VL's flattened patches and ``image_grid_thw``, Idefics3's
tiles and ``pixel_attention_mask``) and the model run.

Families checked against their own pipelines (tests/test_vlm_annotator.py, tests/test_vlm_families.py,
tiny random models): LLaVA, PaliGemma, Qwen2-VL, Idefics3 (SmolVLM-Instruct's architecture). This
module is the ``transformers`` engine; the ``vllm`` engine (``generate`` only) is
:mod:`orchestrator.annotation.vlm_vllm`.

Implementation details / deviations:

1. The paper does not print its LLaVA prompts; ``templates.VLM_PAPER_TEMPLATES`` are written in
   its style. Images are handed to the processor as RGB PIL images (grey images repeated to 3
   channels); the model's own image processor resizes and normalises them.
2. Prompts of one template are equal in length within a batch (same question, same image size),
   so no padding is needed (and the padding side does not matter); positions are whatever each
   family computes itself from the prompt (LLaVA 0..P-1, PaliGemma 1..P, Qwen2-VL's multimodal
   rotary positions) and, for ``score``'s second pass, from the KV cache's length.
3. Scores are summed log-probabilities in float32 (not length-normalised: a longer name is one
   answer, not several); only the probabilities are rounded to float16 for storage.
4. PaliGemma attends to its prefix (image + question) in both directions; the first pass over the
   prompt is that prefix, the answer tokens of the second pass attend causally, as in its training
   format (checked against the processor's ``suffix`` encoding).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.annotation.answers import AnswerParser
from orchestrator.annotation.templates import fill_question, is_lettered, vlm_templates_for

if TYPE_CHECKING:
    import torch

    from orchestrator.config import VlmAnnotatorSpec
    from trainables.data.datasets import Dataset

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
UNPARSED = -1
"""The stored answer of a template whose answer named no class or several."""


class VlmLoadError(RuntimeError):
    """The model or its processor could not be loaded."""


def is_local(model: str) -> bool:
    """A local model directory (else a hub id)."""
    return model.startswith(("/", ".", "~")) or Path(model).expanduser().is_dir()


def model_source(model: str) -> str:
    """What ``from_pretrained`` gets: an absolute directory (actors may run elsewhere) or the hub id."""
    return str(Path(model).expanduser().resolve()) if is_local(model) else model


def load_vlm(model: str, revision: str | None, precision: str, device: str) -> tuple[Any, Any]:
    """The processor and the model (eval mode, ``precision``, on ``device``)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if is_local(model) and not Path(model).is_dir():
        raise FileNotFoundError(f"VLM model directory {model}: no such directory (model: is a hub id or a local directory)")
    try:
        processor = AutoProcessor.from_pretrained(model, revision=revision)
        net = AutoModelForImageTextToText.from_pretrained(
            model, revision=revision, dtype=getattr(torch, DTYPES[precision])
        )
    except (OSError, ValueError, KeyError) as err:
        raise VlmLoadError(
            f"could not load {model!r} (revision {revision}) with AutoProcessor / AutoModelForImageTextToText: {err}. "
            "A hub id needs internet access or a populated Hugging Face cache (HF_HUB_CACHE); offline, "
            "download the model elsewhere and set model: /path/to/directory"
        ) from err
    return processor, net.to(device).eval()


def to_pil(images: np.ndarray) -> list[Any]:
    """uint8 (B, 1 or 3, H, W) -> RGB PIL images."""
    from PIL import Image

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {images.shape}")
    rgb = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
    return [Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))) for im in rgb]


class VlmActor:
    """Per-template answers (``generate``) or class probabilities (``score``) for batches of images;
    a Ray Data ``map_batches`` actor. Each call maps ``{"index": (B,), "image": (B, C, H, W) uint8}``
    to ``{"index", "answers": (B, T) int16, "raw": (B,) JSON lists of the T answers}`` or
    ``{"index", "probs": (B, T, C) float16}``."""

    def __init__(
        self,
        *,
        model: str,
        templates: Sequence[str],
        class_names: Sequence[str],
        answer_mode: str = "generate",
        revision: str | None = None,
        max_new_tokens: int = 16,
        precision: str = "fp32",
        use_gpu: bool = False,
    ):
        import torch

        if use_gpu and not torch.cuda.is_available():
            warnings.warn("GPUs were requested for the VLM annotator but CUDA is not available here; using the CPU", stacklevel=2)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.processor, self.model = load_vlm(model, revision, precision, str(self.device))
        self.tokenizer = self.processor.tokenizer
        self.answer_mode, self.max_new_tokens = answer_mode, max_new_tokens
        self.templates, self.class_names = list(templates), list(class_names)
        self.prompts = [self._prompt(t) for t in self.templates]
        self.parsers = [AnswerParser(tuple(self.class_names), is_lettered(t)) for t in self.templates]
        self.text_prepare_calls = 0
        self._prompt_inputs: dict[tuple, list[dict[str, torch.Tensor]]] = {}
        self.answer_ids: list[list[list[int]]] = []  # per template and class, filled with the first prompts
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _prompt(self, template: str) -> str:
        """The question in the model's conversation format: its processor's chat template, or, for a
        processor without one (PaliGemma), the raw question after the image token, which such a
        processor expands and formats itself (PaliGemma: image tokens, ``<bos>``, question, newline)."""
        question = fill_question(template, self.class_names)
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return (getattr(self.processor, "image_token", None) or "") + question

    def _seen_text(self, prompt: str, image: Any) -> str:
        """The text the processor tokenises for ``prompt`` (its own additions included, before the
        image placeholder is expanded): the answer follows this text."""
        layout = getattr(self.processor, "prepare_inputs_layout", None)
        if layout is None:
            return prompt
        return layout(images=[image], text=[prompt])[1][0]

    def _answer_ids(self, prompt: str) -> list[list[int]]:
        """Per class, the tokens its name adds after ``prompt`` (a space first unless the prompt ends in one)."""
        sep = "" if prompt[-1:].isspace() else " "
        base = self.tokenizer(prompt, add_special_tokens=False).input_ids
        out = []
        for name in self.class_names:
            full = self.tokenizer(prompt + sep + name, add_special_tokens=False).input_ids
            ids = full[len(base) :] if full[: len(base)] == base else self.tokenizer(sep + name, add_special_tokens=False).input_ids
            if not ids:
                raise ValueError(f"class name {name!r} tokenises to nothing after the prompt")
            out.append(ids)
        return out

    def prompt_inputs(self, image: Any) -> list[dict[str, torch.Tensor]]:
        """Per template, the processor's text-side inputs, each (1, P_t): ``input_ids`` with the image
        placeholder expanded for this image size, ``attention_mask`` and whatever else the family
        needs (PaliGemma's ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids``); its image-side
        outputs come per batch from the image processor."""
        key = image.size
        if key not in self._prompt_inputs:
            self.text_prepare_calls += 1
            image_keys = set(self.pixels([image]).keys())
            found = [self.processor(text=[p], images=[image], return_tensors="pt") for p in self.prompts]
            self._prompt_inputs[key] = [{k: v for k, v in f.items() if k not in image_keys and k != "labels"} for f in found]
            if self.answer_mode == "score" and not self.answer_ids:
                self.answer_ids = [self._answer_ids(self._seen_text(p, image)) for p in self.prompts]
        return self._prompt_inputs[key]

    def prompt_ids(self, image: Any) -> list[torch.Tensor]:
        """(1, P_t) prompt tokens per template with the image placeholder expanded for this image size."""
        return [inputs["input_ids"] for inputs in self.prompt_inputs(image)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = to_pil(np.asarray(batch["image"]))
        pixels = self.pixels(images)
        prompts = [self._batched(inputs, len(images)) for inputs in self.prompt_inputs(images[0])]
        index = np.asarray(batch["index"])
        with torch.inference_mode():
            if self.answer_mode == "score":
                probs = torch.stack([self.score(text, pixels, t) for t, text in enumerate(prompts)], dim=1)  # (B, T, C)
                return {"index": index, "probs": probs.to(torch.float16).cpu().numpy()}
            raw = [self.generate(text, pixels) for text in prompts]  # T lists of B answers
        parsed = [[UNPARSED if (c := parse(a)) is None else c for a in texts] for parse, texts in zip(self.parsers, raw)]
        answers = np.array(parsed, dtype=np.int16).T  # (B, T)
        return {"index": index, "answers": answers, "raw": np.array([json.dumps(list(r)) for r in zip(*raw)])}

    def pixels(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The image processor's outputs for a batch, one image per prompt: the images go in as a
        nested list (a flat one is one sample's images for processors that tile, Idefics3/SmolVLM),
        on the model's device, floating point ones in its dtype."""
        found = self.processor.image_processor([[image] for image in images], return_tensors="pt")
        moved = {k: v.to(self.device) for k, v in found.items()}
        return {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in moved.items()}

    def _batched(self, inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
        """One template's (1, P) text inputs repeated for ``b`` images (equal prompts: no padding)."""
        return {k: v.to(self.device).expand(b, *v.shape[1:]) for k, v in inputs.items()}

    def generate(self, text: dict[str, torch.Tensor], pixels: dict[str, torch.Tensor]) -> list[str]:
        """Greedy answers (decoded new tokens) of one template for the batch."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(
            **text, **pixels, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
        )  # fmt: skip
        new = out[:, text["input_ids"].shape[1] :]
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def score(self, text: dict[str, torch.Tensor], pixels: dict[str, torch.Tensor], template: int) -> torch.Tensor:
        """(B, C) float32 probabilities of each class name as the answer to one template."""
        import torch

        answers = self.answer_ids[template]
        b = text["input_ids"].shape[0]
        out = self.model(**text, **pixels, use_cache=True, **self._keep_last)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
        scores = first[:, torch.tensor([a[0] for a in answers], device=self.device)]  # (B, C)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        for c, answer in enumerate(answers):
            if len(answer) == 1:
                continue
            tokens = torch.tensor(answer, device=self.device).expand(b, -1)  # (B, L)
            rest = self.model(input_ids=tokens[:, :-1], **{self._cache_arg: cache}, use_cache=True)
            logp = rest.logits.float().log_softmax(-1)  # (B, L-1, V)
            scores[:, c] += logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
            self._crop(cache, len(answer) - 1)
        return scores.softmax(-1)

    @staticmethod
    def _crop(cache: Any, added: int) -> None:
        """Drop the ``added`` answer tokens just appended to the prompt's KV cache (a negative
        ``crop`` removes that many tokens in transformers 4 and 5 alike)."""
        if not hasattr(cache, "crop"):
            raise NotImplementedError(f"answer_mode score needs a KV cache that can be cropped; {type(cache).__name__} cannot (use generate)")
        cache.crop(-added)


def actor_kwargs(spec: VlmAnnotatorSpec, class_names: Sequence[str]) -> dict[str, Any]:
    """Constructor arguments of :class:`VlmActor` for an annotator spec."""
    return {
        "model": model_source(spec.model),
        "revision": spec.revision,
        "templates": vlm_templates_for(spec.templates),
        "class_names": list(class_names),
        "answer_mode": spec.answer_mode,
        "max_new_tokens": spec.max_new_tokens,
        "precision": spec.precision,
        "use_gpu": spec.gpus_per_actor > 0,
    }


def annotate_vlm(
    dataset: Dataset,
    spec: VlmAnnotatorSpec,
    class_names: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Every train and test image under every template, on a Ray Data actor pool like the CLIP stage.

    Returns ``probs_train`` / ``probs_test`` ((N, T, C) float16, ``score``) or ``answers_train`` /
    ``answers_test`` ((N, T) int16, -1 unparseable) and ``raw_train`` / ``raw_test`` (N lists of T
    answer strings, ``generate``)."""
    import ray

    from orchestrator.annotation.clip import _image_blocks

    kwargs = actor_kwargs(spec, class_names)
    n_train, total = len(dataset.train_x), len(dataset.train_x) + len(dataset.test_x)
    num_t = len(kwargs["templates"])
    ds = ray.data.from_arrow(_image_blocks([dataset.train_x, dataset.test_x], spec.batch_size))
    out = ds.map_batches(
        VlmActor, fn_constructor_kwargs=kwargs, batch_size=spec.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=spec.num_actors), num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor if spec.gpus_per_actor > 0 else None, udf_modifying_row_count=False,
    )  # fmt: skip
    score = spec.answer_mode == "score"
    result = np.empty((total, num_t, len(class_names)) if score else (total, num_t), np.float16 if score else np.int16)
    raw: list[Any] = [None] * total
    seen, done = np.zeros(total, dtype=np.int64), 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        index = batch["index"]
        result[index] = batch["probs" if score else "answers"]
        if not score:
            for i, text in zip(index, batch["raw"]):
                raw[i] = json.loads(str(text))
        seen[index] += 1
        done += len(index)
        if progress is not None:
            progress(done, total)
    if not (seen == 1).all():
        raise RuntimeError(f"VLM annotation returned {int((seen == 0).sum())} missing and {int((seen > 1).sum())} duplicated samples")
    name = "probs" if score else "answers"
    found = {f"{name}_train": result[:n_train], f"{name}_test": result[n_train:]}
    return found if score else {**found, "raw_train": raw[:n_train], "raw_test": raw[n_train:]}
