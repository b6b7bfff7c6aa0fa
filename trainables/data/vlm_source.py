"""Where a trial finds its annotator's image-text-to-text model: the model, its precision, the
questions it was asked, how its answers were read, and the class names.

``vlm_lora`` fine-tunes the very VLM that annotated the cell. As for a CLIP
(:mod:`trainables.data.clip_source`), everything is read from the cached annotation's
``meta.json``: the resolved annotator entry, the templates and the class names it asked with. An
ensemble's VLM is its first VLM member. Nothing here imports torch or transformers;
:func:`trainables.common.vlm_model.load_source` builds the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trainables.data.annotation import read_entry


@dataclass(frozen=True)
class VlmSource:
    """The image-text-to-text model of a ``vlm`` annotator and how it was asked."""

    model: str
    """Hub id or local directory (as the grid gave it; :meth:`resolved` makes a relative one absolute)."""
    revision: str | None
    precision: str
    """``fp32``, ``fp16`` or ``bf16``."""
    templates: tuple[str, ...]
    """The question templates, resolved."""
    class_names: tuple[str, ...]
    answer_mode: str = "generate"
    """``generate`` (parsed greedy answers) or ``score`` (each class name's probability)."""
    max_new_tokens: int = 16

    def resolved(self, base: Path) -> "VlmSource":
        """A relative model directory taken relative to ``base`` (the directory the grid ran from)."""
        path = Path(self.model).expanduser()
        local = self.model.startswith((".", "/", "~")) or (base / path).is_dir()
        return dataclasses.replace(self, model=str(base / path)) if local and not path.is_absolute() else self

    def to_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "templates": list(self.templates), "class_names": list(self.class_names)}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> "VlmSource":
        return cls(**{**raw, "templates": tuple(raw["templates"]), "class_names": tuple(raw["class_names"])})


@dataclass
class LoadedVlm:
    """A :class:`VlmSource` built: what ``vlm_lora`` is given in its build context."""

    source: VlmSource
    processor: Any
    model: Any
    """The ``AutoModelForImageTextToText`` model, eval mode, on the trial's device."""


def vlm_source(cache_dir: Path, key: str) -> VlmSource | None:
    """The VLM behind the cached annotation ``key``: a ``vlm`` annotator's own model, or an
    ensemble's first VLM member; None for annotators without one."""
    found = read_entry(Path(cache_dir) / key)
    if found is None:
        raise FileNotFoundError(f"annotation {key} is not in the cache {cache_dir}")
    meta = found[1]
    if meta.get("kind") == "vlm":
        ann = meta["annotator"]
        return VlmSource(
            model=ann["model"],
            revision=ann.get("revision"),
            precision=ann.get("precision", "fp32"),
            templates=tuple(meta["templates"]),
            class_names=tuple(meta["class_names"]),
            answer_mode=ann.get("answer_mode", "generate"),
            max_new_tokens=int(ann.get("max_new_tokens", 16)),
        )
    for member in meta.get("members", []) if meta.get("kind") == "ensemble" else []:
        source = vlm_source(cache_dir, member)
        if source is not None:
            return source
    return None
