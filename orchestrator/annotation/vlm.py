"""The image-text-to-text (LLaVA-style) annotator: transformers' auto classes on a Ray Data actor pool.

Co-Reg (extended paper, section III) asks LLaVA-1.5 one question per prompt template, each listing
every class name as a choice, in the model's conversation format, maps each answer to a class and
takes the union over templates as the candidate set. :class:`VlmActor` loads any model that
``AutoProcessor`` + ``AutoModelForImageTextToText`` load (a hub id or a local directory) and asks it
through :class:`trainables.common.vlm_model.VlmQuestioner`, which holds the prompts, the two answer
modes (``generate``: parsed greedy answers; ``score``: each class name's probability as the answer)
and their details; the fine-tuned annotator of ``vlm_lora`` is asked by the same code. The
per-template probabilities are stored like CLIP's, so every candidate mode, noisy label, soft
label and zero-shot statistic derives from them.

Families checked against their own pipelines (tests/test_vlm_annotator.py, tests/test_vlm_families.py,
tiny random models): LLaVA, PaliGemma, Qwen2-VL, Idefics3 (SmolVLM-Instruct's architecture). This
module is the ``transformers`` engine; the ``vllm`` engine (``generate`` only) is
:mod:`orchestrator.annotation.vlm_vllm`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.annotation.templates import vlm_templates_for
from trainables.common.vlm_model import VlmQuestioner, load_vlm, model_source, pick_device, to_pil

if TYPE_CHECKING:
    from orchestrator.config import VlmAnnotatorSpec
    from trainables.data.datasets import Dataset


class VlmActor(VlmQuestioner):
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
        processor, net = load_vlm(model, revision, precision, str(pick_device(use_gpu)))
        super().__init__(
            processor, net, templates=templates, class_names=class_names, answer_mode=answer_mode, max_new_tokens=max_new_tokens
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        found = self.answer(to_pil(np.asarray(batch["image"])))
        index = np.asarray(batch["index"])
        if self.answer_mode == "score":
            return {"index": index, "probs": found["probs"].to(torch.float16).cpu().numpy()}
        raw = np.array([json.dumps(list(r)) for r in zip(*found["raw"])])
        return {"index": index, "answers": found["answers"], "raw": raw}


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
