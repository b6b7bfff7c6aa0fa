"""Checks of a ``vlm`` annotator's model files before Ray starts (the sweep and ``--dry-run``).

A local directory must hold what ``AutoProcessor`` and ``AutoModelForImageTextToText`` read: the
model config, weights, a tokenizer and the image processor's config; each missing one is named. A
hub id must be in the local Hugging Face cache, or the hub must answer (else the actors would fail
minutes later, one after another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator.annotation.clip_check import reachable
from orchestrator.config import VlmAnnotatorSpec

REQUIRED = {
    "model config": ("config.json",),
    "weights": ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin"),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"),
    "image processor config": ("processor_config.json", "preprocessor_config.json"),
}
"""What a local model directory needs: for each part, any one of these file patterns."""

HUB_FILES = ("config.json", "tokenizer_config.json")


def missing_parts(directory: Path) -> list[str]:
    """The parts of :data:`REQUIRED` a local model directory lacks, each with the files looked for."""
    return [
        f"{part} ({' or '.join(patterns)})"
        for part, patterns in REQUIRED.items()
        if not any(next(directory.glob(p), None) is not None for p in patterns)
    ]


def has_chat_template(directory: Path) -> bool:
    """A local model directory carries a chat template (its own file, or in the processor's or tokenizer's config)."""
    import json

    if any((directory / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("chat_template"):
            return True
    return False


def _hub_problem(repo: str, revision: str | None) -> str | None:
    """Why a hub id cannot be loaded here (None: it is cached, or the hub answers)."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = [f for f in HUB_FILES if not isinstance(try_to_load_from_cache(repo, f, revision=revision), str)]
    if not missing:
        return None
    where = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}; missing {', '.join(missing)})"
    if constants.HF_HUB_OFFLINE:
        return f"{where} and HF_HUB_OFFLINE is set"
    if not reachable(constants.ENDPOINT):
        host = urlsplit(constants.ENDPOINT).hostname
        return f"{where} and the hub ({host}) cannot be reached; download the model elsewhere and set model: /path/to/directory"
    return None


def vlm_problems(where: str, ann: VlmAnnotatorSpec, datasets: Any) -> list[str]:
    """The model files and class names of one ``vlm`` annotator, one line per problem."""
    from trainables.common.vlm_model import is_local

    problems = []
    if is_local(ann.model):
        directory = Path(ann.model).expanduser()
        if not directory.is_dir():
            problems.append(f"{where}.model: no such model directory {ann.model}")
        else:
            problems += [f"{where}.model: {directory} has no {part}" for part in missing_parts(directory)]
            if ann.engine_to_run() == "vllm" and not has_chat_template(directory):
                problems.append(
                    f"{where}.model: {directory} has no chat template, which the vllm engine needs "
                    "(Ray's chat template stage); set engine: transformers (it formats such a model's raw prompt)"
                )
    else:
        reason = _hub_problem(ann.model, ann.revision)
        if reason:
            problems.append(f"{where}.model: hub model {ann.model!r} is {reason}")
    for ds in datasets:
        if ann.class_names is not None and len(ann.class_names) != len(ds.class_names):
            problems.append(f"{where}.class_names: {len(ann.class_names)} names but {ds.name} has {len(ds.class_names)} classes")
    return problems


def _why_not_vllm(ann: VlmAnnotatorSpec) -> str:
    """Why ``engine: auto`` runs on transformers here (``engine_to_run`` said so)."""
    from orchestrator.config import vllm_installed

    if ann.engine == "transformers":
        return "engine: transformers asked for"
    if not vllm_installed():
        return "vLLM not installed"
    if ann.answer_mode == "score":
        return "vLLM is installed but only generates (answer_mode score)"
    return "vLLM is installed but this annotator asks for no GPU"


def engine_line(where: str, ann: VlmAnnotatorSpec) -> str:
    """Which engine will annotate, and why (printed by ``--dry-run``)."""
    from importlib.metadata import version

    gpus = f"{ann.gpus_per_actor:g} GPU" if ann.gpus_per_actor > 0 else "CPU"
    tail = f"answer_mode {ann.answer_mode}, {ann.num_actors} actor(s) x {gpus}, {ann.precision}"
    if ann.engine_to_run() == "vllm":
        return (
            f"{where} ({ann.name}): engine vllm {version('vllm')} through Ray Data's LLM processor "
            f"(ray.data.llm, engine: {ann.engine}), {tail}"
        )
    return (
        f"{where} ({ann.name}): engine transformers {version('transformers')} (AutoModelForImageTextToText), "
        f"{tail}; {_why_not_vllm(ann)}"
    )
