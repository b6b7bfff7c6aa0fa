"""Checks of a CLIP-family annotator's weights and tokenizer before Ray starts (the sweep and ``--dry-run``).

open_clip fetches what a model needs on first use, inside each actor: the weights of a pretrained
tag (from the Hugging Face hub or a URL) and, for some models, the tokenizer (an HF tokenizer named
by the config's ``hf_tokenizer_name``; SigLIP configs without one use a sentencepiece vocabulary
that open_clip downloads at every start). Offline that fails minutes later, once per actor. Here
each is looked up in its local cache first; when it is not there and its host cannot be reached,
the missing file is named. MetaCLIP tags (and any tag trained with QuickGELU) on a model without
QuickGELU are refused: open_clip would only warn and run the weights with the wrong activation.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator.config import ClipAnnotatorSpec

HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def reachable(url: str, timeout: float = 5.0) -> bool:
    """A TCP connection to the URL's host can be opened within ``timeout`` seconds."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _hub_missing(repo: str, names: tuple[str, ...]) -> str | None:
    """None when one of ``names`` of hub repo ``repo`` is cached or the hub answers; else why not."""
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return None
    if not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT):
        return None
    files = " or ".join(f"{repo}/{n}" for n in names)
    return f"{files} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached"


def _tag_problems(where: str, spec: ClipAnnotatorSpec, cfg: dict[str, Any]) -> list[str]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    tag = spec.pretrained
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if tag not in tags:
        return [f"{where}.pretrained: open_clip has no weights {tag!r} for model {spec.model} (tags: {', '.join(tags) or 'none'})"]
    weights = get_pretrained_cfg(spec.model, tag)
    if weights.get("quick_gelu") and not cfg.get("quick_gelu") and tag != "openai":  # open_clip builds OpenAI's own way
        return [f"{where}.pretrained: {tag} weights were trained with QuickGELU; use model {spec.model}-quickgelu"]
    if weights.get("hf_hub"):
        missing = _hub_missing(weights["hf_hub"].rstrip("/"), HF_WEIGHTS)
        return [f"{where}.pretrained: weights {missing}"] if missing else []
    url = weights.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / Path(urlsplit(url).path).name
    if url and not cached.is_file() and not reachable(url):
        return [f"{where}.pretrained: weights {url} are not in {cached.parent} and cannot be downloaded from here"]
    return []


def _tokenizer_problems(where: str, spec: ClipAnnotatorSpec, name: str, cfg: dict[str, Any]) -> list[str]:
    from open_clip.tokenizer import SigLipTokenizer

    text = cfg.get("text_cfg", {})
    if text.get("hf_tokenizer_name"):
        missing = _hub_missing(text["hf_tokenizer_name"], HF_TOKENIZER)
        return [f"{where}.model: tokenizer {missing}"] if missing else []
    if "siglip" in name.lower():  # open_clip's rule: a SigLIP name without an HF tokenizer
        variant = "gemma" if "siglip2" in name.lower() else "mc4" if "i18n" in name.lower() else "c4-en"
        url = SigLipTokenizer.VOCAB_FILES[variant]
        if not reachable(url):
            return [f"{where}.model: the tokenizer of {name} is the sentencepiece vocabulary {url}, which open_clip downloads at start and which cannot be reached"]
    return []


def weights_and_tokenizer_problems(where: str, spec: ClipAnnotatorSpec) -> list[str]:
    """Why the weights or the tokenizer of a CLIP-family annotator would not load here (empty: they would)."""
    from orchestrator.annotation.clip import _looks_like_path, model_config, model_name_for

    try:
        cfg, name = model_config(spec), model_name_for(spec)
    except (OSError, ValueError):
        return []  # the model config's own problems are reported by the caller
    problems = []
    tag = spec.pretrained
    if tag is not None and spec.model_config_path is None and not _looks_like_path(tag) and not tag.startswith("hf-hub:"):
        problems += _tag_problems(where, spec, cfg)
    return problems + _tokenizer_problems(where, spec, name, cfg)
