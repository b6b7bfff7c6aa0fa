"""An image-text-to-text model (LLaVA-style) asked the annotator's questions: loading, prompts,
answers and class scores, shared by the annotator's Ray Data actors
(``orchestrator/annotation/vlm.py``) and the methods that fine-tune the annotator (``vlm_lora``).

Co-Reg (extended paper, section III) asks LLaVA-1.5 one question per prompt template, each listing
every class name as a choice, in the model's conversation format, and maps each answer to a class.
:class:`VlmQuestioner` wraps any model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load
and answers a batch of images under every template in one of two modes:

- ``generate``: greedy decoding of at most ``max_new_tokens`` tokens; the answer is parsed back to a
  class by :mod:`trainables.common.answers` (-1 when it names no class or several).
- ``score``: the probability of each class name as the whole answer,
  p_t(c) = P(name_c | image, question_t) / sum_c' P(name_c' | image, question_t), with
  P(name | ...) the product of its tokens' conditional probabilities. One forward pass over the
  image and the question gives the first answer token's distribution and a KV cache; each class
  name of more than one token then costs a short pass over its remaining tokens on that cache,
  which is cropped back to the prompt afterwards (memory stays that of one prompt's cache, whatever
  the number of classes).

:meth:`VlmQuestioner.answer_loss` is the teacher-forced loss of a class name as the answer (the
fine-tuning objective of ``vlm_lora``), built from the same prompts and answer tokens as ``score``.

Text-side work is done once per questioner: the questions are built with the processor's chat
template (``apply_chat_template``, generation prompt added) or, for a processor without one
(PaliGemma), as the raw question after the image token, which such a processor formats itself;
each is run once through the processor per image size (every image of a data set has the same
size), which expands the image placeholder and gives every text-side input the family needs
(``input_ids``, ``attention_mask``, PaliGemma's ``token_type_ids``, Qwen2-VL's
``mm_token_type_ids``); the class names' answer tokens (the tokens a name adds after the text the
processor really tokenises, its own additions included: PaliGemma's newline) are tabled per
template. Per batch only the image processor (its outputs whatever their shape: Qwen2-VL's
flattened patches and ``image_grid_thw``, Idefics3's tiles and ``pixel_attention_mask``) and the
model run.

Implementation details / deviations:

1. The paper does not print its LLaVA prompts; ``orchestrator.annotation.templates`` writes them in
   its style. Images are handed to the processor as RGB PIL images (grey images repeated to 3
   channels); the model's own image processor resizes and normalises them.
2. Prompts of one template are equal in length within a batch (same question, same image size),
   so no padding is needed (and the padding side does not matter); positions are whatever each
   family computes itself from the prompt (LLaVA 0..P-1, PaliGemma 1..P, Qwen2-VL's multimodal
   rotary positions) and, for ``score``'s second pass, from the KV cache's length. The answers of
   :meth:`~VlmQuestioner.answer_loss` differ in length: they are padded on the right and masked.
3. Scores are summed log-probabilities in float32 (not length-normalised: a longer name is one
   answer, not several).
4. PaliGemma attends to its prefix (image + question) in both directions; the first pass over the
   prompt is that prefix, the answer tokens of the second pass attend causally, as in its training
   format (checked against the processor's ``suffix`` encoding); in the loss the answer tokens are
   the suffix (``token_type_ids`` 1).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.common.answers import AnswerParser, fill_question, is_lettered

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


def pick_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present (a warning when asked for and absent), else the CPU."""
    if use_gpu and not torch.cuda.is_available():
        warnings.warn("GPUs were requested for the VLM but CUDA is not available here; using the CPU", stacklevel=2)
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class VlmQuestioner:
    """A loaded processor and model asked every template's question about batches of images:
    :meth:`answer` gives per-template answers (``generate``) or class probabilities (``score``),
    :meth:`answer_loss` the loss of given classes as the answers."""

    def __init__(
        self,
        processor: Any,
        model: Any,
        *,
        templates: Sequence[str],
        class_names: Sequence[str],
        answer_mode: str = "generate",
        max_new_tokens: int = 16,
    ):
        self.processor, self.model = processor, model
        self.device = next(model.parameters()).device
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

    def class_answer_ids(self, image: Any) -> list[list[list[int]]]:
        """Per template and class, the answer tokens of the class name (as ``score`` reads them)."""
        self.prompt_inputs(image)
        if not self.answer_ids:
            self.answer_ids = [self._answer_ids(self._seen_text(p, image)) for p in self.prompts]
        return self.answer_ids

    def answer(self, images: list[Any]) -> dict[str, Any]:
        """Every template's answer for a batch of PIL images: ``{"probs": (B, T, C) float32}``
        (``score``) or ``{"answers": (B, T) int16 classes (-1 unparsed), "raw": T lists of B texts}``."""
        pixels = self.pixels(images)
        prompts = [self._batched(inputs, len(images)) for inputs in self.prompt_inputs(images[0])]
        with torch.inference_mode():
            if self.answer_mode == "score":
                return {"probs": torch.stack([self.score(text, pixels, t) for t, text in enumerate(prompts)], dim=1)}
            raw = [self.generate(text, pixels) for text in prompts]  # T lists of B answers
        parsed = [[UNPARSED if (c := parse(a)) is None else c for a in texts] for parse, texts in zip(self.parsers, raw)]
        return {"answers": np.array(parsed, dtype=np.int16).T, "raw": raw}

    def answer_loss(self, images: list[Any], labels: torch.Tensor, template: int) -> torch.Tensor:
        """Mean cross-entropy of each image's class name (then the end-of-sequence token) as the
        answer to ``template``'s question, teacher-forced: next-token prediction on the answer
        tokens only (the prompt and the padding are not scored). ``labels``: (B,) classes."""
        names = self.class_answer_ids(images[0])[template]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        answers = [names[int(c)] + eos for c in labels]
        width = max(len(a) for a in answers)
        ids = torch.zeros(len(answers), width, dtype=torch.long)
        mask = torch.zeros(len(answers), width, dtype=torch.long)
        for i, a in enumerate(answers):
            ids[i, : len(a)], mask[i, : len(a)] = torch.tensor(a), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        text = self._batched(self.prompt_inputs(images[0])[template], len(answers))
        inputs = {k: torch.cat([v, self._answer_side(k, ids, mask)], dim=1) for k, v in text.items()}
        keep = {"logits_to_keep": width + 1} if self._keep_last else {}
        logits = self.model(**inputs, **self.pixels(images), **keep).logits[:, -(width + 1) : -1].float()  # (B, L, V)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, L)
        return (losses * mask).sum() / mask.sum()

    @staticmethod
    def _answer_side(key: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The answer's part of a text-side input: its tokens, its mask, PaliGemma's suffix marks
        (``token_type_ids`` 1: attended causally), 0 (plain text) for any other per-token input."""
        if key == "input_ids":
            return ids
        if key == "attention_mask":
            return mask
        return mask if key == "token_type_ids" else torch.zeros_like(ids)

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




def load_source(source: Any, device: torch.device | str = "cpu") -> Any:
    """A :class:`~trainables.data.vlm_source.VlmSource` built: its processor and model on ``device``."""
    from trainables.data.vlm_source import LoadedVlm

    processor, model = load_vlm(model_source(source.model), source.revision, source.precision, str(device))
    return LoadedVlm(source=source, processor=processor, model=model)
