"""The ``vllm`` engine of the ``vlm`` annotator: Ray Data's LLM processor (``ray.data.llm``) with a
vLLM engine, for ``answer_mode: generate`` on GPUs.

NOT RUN IN THIS PROJECT'S TESTS: vLLM needs a GPU and is not installed on the development machine.
What the tests check offline is the engine choice, the refusals, the processor configuration built
from the grid (model, batch size, actors, GPUs, precision) and the plumbing around the engine (rows
in, per-template answers out, parsed like the transformers path's) with ``build_processor``
replaced by a stand-in engine.

One request per image and template: the image (PNG, as a data URL) and the template's question in
one user message, which Ray's stages turn into the model's input (``prepare_multimodal_stage``:
vLLM's multimodal parsing; ``chat_template_stage``: the model's chat template; tokenizer), greedy
decoding (temperature 0) of at most ``max_new_tokens`` tokens, detokenised without special tokens.
The answers are parsed on the driver by the same :class:`~trainables.common.answers.AnswerParser`
as the transformers path, and stored the same way (``answers_*`` int16 with -1 unparseable,
``raw_*`` the texts). A model without a chat template (PaliGemma) cannot go through the chat template
stage: use ``engine: transformers`` for it.

Resources: ``num_actors`` engines (``concurrency``), each with ``gpus_per_actor`` GPUs: a whole
number is vLLM's tensor parallel size (one GPU per worker); a fraction below 1 shares a GPU (the
placement bundle asks for that fraction and vLLM's ``gpu_memory_utilization`` is scaled to it).
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from trainables.common.answers import AnswerParser, fill_question, is_lettered
from orchestrator.annotation.templates import vlm_templates_for
from trainables.common.vlm_model import DTYPES, UNPARSED, model_source, to_pil

if TYPE_CHECKING:
    from orchestrator.config import VlmAnnotatorSpec
    from trainables.data.datasets import Dataset

GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of a whole GPU; a fractional ``gpus_per_actor`` scales it."""


def processor_config(spec: VlmAnnotatorSpec) -> Any:
    """The ``vLLMEngineProcessorConfig`` of an annotator: its model, batch size, actors, GPUs and precision."""
    from ray.data.llm import vLLMEngineProcessorConfig

    gpus = spec.gpus_per_actor
    engine: dict[str, Any] = {"dtype": DTYPES[spec.precision], "limit_mm_per_prompt": {"image": 1}}
    if spec.revision is not None:
        engine["revision"] = spec.revision
    if gpus < 1:
        engine["gpu_memory_utilization"] = round(GPU_MEMORY_UTILIZATION * gpus, 4)
        bundle = {"GPU": gpus, "CPU": spec.cpus_per_actor}
    else:
        engine["tensor_parallel_size"] = int(gpus)
        bundle = {"GPU": 1, "CPU": spec.cpus_per_actor}
    return vLLMEngineProcessorConfig(
        model_source=model_source(spec.model), engine_kwargs=engine, batch_size=spec.batch_size,
        concurrency=spec.num_actors, placement_group_config={"bundle_per_worker": bundle},
        prepare_multimodal_stage={"enabled": True}, chat_template_stage={"enabled": True},
        tokenize_stage={"enabled": True}, detokenize_stage={"enabled": True},
    )  # fmt: skip


def png_data_url(image: np.ndarray) -> str:
    """One uint8 (C, H, W) image as an RGB PNG data URL (what vLLM's chat parser reads)."""
    buffer = io.BytesIO()
    to_pil(image[None])[0].save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request(row: dict[str, Any], *, questions: Sequence[str], max_new_tokens: int) -> dict[str, Any]:
    """The processor's input row of one (image, template): a user message and greedy sampling."""
    content = [{"type": "image_url", "image_url": {"url": row["url"]}}, {"type": "text", "text": questions[row["template"]]}]
    return {
        "index": row["index"], "template": row["template"], "messages": [{"role": "user", "content": content}],
        "sampling_params": {"temperature": 0.0, "max_tokens": max_new_tokens, "detokenize": False},
    }  # fmt: skip


def answer(row: dict[str, Any]) -> dict[str, Any]:
    """The processor's output row reduced to what the annotator stores."""
    return {"index": int(row["index"]), "template": int(row["template"]), "answer": str(row["generated_text"]).strip()}


def _per_template(row: dict[str, Any], num_templates: int) -> list[dict[str, Any]]:
    return [{"index": row["index"], "template": t, "url": row["url"]} for t in range(num_templates)]


def annotate_vllm(
    dataset: Dataset,
    spec: VlmAnnotatorSpec,
    class_names: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Every train and test image under every template through the vLLM processor; returns what
    :func:`orchestrator.annotation.vlm.annotate_vlm` returns in ``generate`` mode."""
    import ray
    from ray.data.llm import build_processor

    templates = vlm_templates_for(spec.templates)
    questions = [fill_question(t, list(class_names)) for t in templates]
    images = np.concatenate([dataset.train_x, dataset.test_x])
    n_train, total, num_t = len(dataset.train_x), len(images), len(templates)
    processor = build_processor(
        processor_config(spec),
        preprocess=functools.partial(request, questions=questions, max_new_tokens=spec.max_new_tokens),
        postprocess=answer,
    )
    rows = ray.data.from_items([{"index": i, "url": png_data_url(im)} for i, im in enumerate(images)])
    out = processor(rows.flat_map(functools.partial(_per_template, num_templates=num_t)))
    raw: list[list[str | None]] = [[None] * num_t for _ in range(total)]
    done = 0
    for row in out.iter_rows():
        if raw[row["index"]][row["template"]] is not None:
            raise RuntimeError(f"vLLM returned image {row['index']} template {row['template']} twice")
        raw[row["index"]][row["template"]] = row["answer"]
        done += 1
        if progress is not None and done % num_t == 0:
            progress(done // num_t, total)
    if done != total * num_t:
        raise RuntimeError(f"vLLM answered {done} of {total * num_t} (image, template) requests")
    parsers = [AnswerParser(tuple(class_names), is_lettered(t)) for t in templates]
    answers = np.array(
        [[UNPARSED if (c := parsers[t](r[t])) is None else c for t in range(num_t)] for r in raw], dtype=np.int16
    ).reshape(total, num_t)
    return {
        "answers_train": answers[:n_train], "answers_test": answers[n_train:], "raw_train": raw[:n_train], "raw_test": raw[n_train:],
    }  # fmt: skip
