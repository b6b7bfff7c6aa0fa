"""Where a trial finds its annotator's CLIP: the model, its weights, the prompts and the class names.

CoOp and the ``clip_peft`` backbone learn on top of the very CLIP that annotated the cell. A trial
does not re-read grid.yaml: everything it needs is in the cached annotation's ``meta.json``, which
the annotation stage wrote with the resolved annotator entry, the templates and the class
descriptions it prompted with (:func:`clip_source`). An ensemble annotator's CLIP is its first
CLIP member. Nothing here imports torch or open_clip; :mod:`trainables.common.clip_model` builds
the model from a :class:`ClipSource`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trainables.data.annotation import read_entry


FILE_SUFFIXES = (".json", ".bin", ".pt", ".pth", ".safetensors")
"""Suffixes of the files an annotator entry may name (its model config, a local checkpoint)."""


@dataclass(frozen=True)
class ClipSource:
    """The open_clip model of a CLIP annotator and what it prompted with."""

    model: str
    """open_clip model name (the config file's stem when ``model_config_path`` is set)."""
    pretrained: str | None
    """open_clip pretrained tag, hub id or local checkpoint; None: random weights from ``init_seed``."""
    model_config_path: str | None
    templates: tuple[str, ...]
    """The annotator's prompt templates (one ``{}`` each), resolved."""
    class_names: tuple[str, ...]
    """The class descriptions the annotator prompted with, in label order."""
    logit_scale: float = 100.0
    """The annotator's softmax scale (Co-Reg: 100)."""
    init_seed: int = 0
    """Seed of random weights (``pretrained: null``), as the annotator's actors use."""

    def without_weights(self) -> "ClipSource":
        """The same architecture with random weights: a student rebuilds it, then loads its own state."""
        return dataclasses.replace(self, pretrained=None)

    def resolved(self, base: Path) -> "ClipSource":
        """Relative file paths (a model config, a local checkpoint) taken relative to ``base``, the
        directory the grid was run from (a Tune trial runs in its own directory)."""

        def absolute(path: str | None) -> str | None:
            is_file = path is not None and not path.startswith("hf-hub:") and Path(path).suffix in FILE_SUFFIXES
            return str(base / path) if is_file and not Path(path).expanduser().is_absolute() else path

        return dataclasses.replace(self, model_config_path=absolute(self.model_config_path), pretrained=absolute(self.pretrained))

    def to_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "templates": list(self.templates), "class_names": list(self.class_names)}

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> "ClipSource":
        return cls(**{**raw, "templates": tuple(raw["templates"]), "class_names": tuple(raw["class_names"])})


@dataclass
class LoadedClip:
    """A :class:`ClipSource` built (``trainables.common.clip_model.load_source``): what a method or
    the ``clip_peft`` backbone is given in its build context."""

    source: ClipSource
    model: Any
    """The open_clip model, float32, eval mode."""
    tokenizer: Any
    preprocess_cfg: dict[str, Any]
    """open_clip's preprocess config of the model (size, mean, std, interpolation, resize mode)."""


def _from_meta(meta: Mapping[str, Any]) -> ClipSource:
    ann = meta["annotator"]
    config_path = ann.get("model_config_path")
    model = Path(config_path).stem if config_path else ann["model"]
    return ClipSource(
        model=model,
        pretrained=ann.get("pretrained"),
        model_config_path=config_path,
        templates=tuple(meta["templates"]),
        class_names=tuple(meta["class_names"]),
        logit_scale=float(ann.get("logit_scale", 100.0)),
    )


def clip_source(cache_dir: Path, key: str) -> ClipSource | None:
    """The CLIP behind the cached annotation ``key``: a CLIP annotator's own model, or an ensemble's
    first CLIP member; None for annotators without one (synthetic, given, a VLM)."""
    found = read_entry(Path(cache_dir) / key)
    if found is None:
        raise FileNotFoundError(f"annotation {key} is not in the cache {cache_dir}")
    meta = found[1]
    if meta.get("kind") == "clip":
        return _from_meta(meta)
    for member in meta.get("members", []) if meta.get("kind") == "ensemble" else []:
        source = clip_source(cache_dir, member)
        if source is not None:
            return source
    return None
