"""The CLIP annotator: per-template zero-shot probabilities with open_clip, on a Ray Data actor pool.

For every prompt template t and class c the text ``t.format(class_name)`` is encoded once per
actor and L2-normalised, giving ``T`` (T, C, D). An image's L2-normalised embedding r gives, per
template, p_t = softmax(logit_scale * r . T_t^T) (Co-Reg section III, logit_scale = 100).

SigLIP models (Zhai et al. 2023; an open_clip config with ``init_logit_bias``, e.g.
``ViT-B-16-SigLIP``) were trained with a sigmoid loss, not a softmax over classes: each class gets
s_c = sigmoid(exp(t') * r . T_c + b) with the model's own learned scale t' and bias b (the grid's
``logit_scale`` does not apply). Stored per template is s_c / sum_c' s_c', so that candidate sets,
noisy labels and soft labels derive as for CLIP (the argmax is that of s).
MetaCLIP weights (``pretrained: metaclip_400m`` / ``metaclip_fullcc``) are open_clip tags like any
other; they were trained with QuickGELU, so they go with the ``-quickgelu`` models (checked before
Ray starts, :mod:`orchestrator.annotation.clip_check`).
:class:`ClipActor` does this for one batch; :func:`annotate_clip` streams a data set's train and
test images through a pool of such actors (``Dataset.map_batches``) and reassembles the
(N, T, C) float16 probabilities in sample order.

Implementation details / deviations from the reference (github Portugas0807/Co-Reg,
``utils/utils_experi.py``, ``clip_annotate``, which uses OpenAI's ``clip`` package):

1. Preprocessing runs on the actor's device on whole uint8 batches (resize with antialiasing and
   the model's interpolation, centre crop or pad, grey to RGB, normalise), with the size / mean /
   std / interpolation / resize mode of the model's own open_clip preprocess config. The
   reference applies PIL transforms image by image; on CPU the two agree within about two grey
   levels per pixel, on CUDA torchvision resizes in float and rounds, which can differ by a few levels.
2. ``pretrained: null`` builds randomly initialised weights from a fixed seed (``init_seed``), so
   every actor of a pool holds the same model (needed for tests and benchmarks).
3. Image features are renormalised in float32 after a low-precision (fp16 / bf16) forward pass;
   softmax is taken in float32 and only the result is rounded to float16 for storage.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Loading, preprocessing and the checks of a model config live on the learning side, where CoOp and
# the clip_peft backbone rebuild the annotator's model; re-exported here for the annotator's callers.
from trainables.common.clip_model import (  # noqa: F401
    TEXT_CHUNK,
    ClipLoadError,
    load_clip_model,
    looks_like_path as _looks_like_path,
    preprocess_images,
    read_model_config,
)

if TYPE_CHECKING:
    import torch

    from orchestrator.config import ClipAnnotatorSpec
    from trainables.data.datasets import Dataset

PREPROCESS_VERSION = 1
"""Bump when :func:`preprocess_images` changes what it computes (it is part of the cache key)."""


def model_name_for(spec: ClipAnnotatorSpec) -> str:
    """The open_clip model name of an annotator spec.

    open_clip registers a config file under its file name, so with ``model_config_path`` the name
    is the file's stem. A ``model`` other than the default that names something else is refused
    rather than silently ignored (the default is let through: a spec round-tripped through
    ``model_dump`` carries it).
    """
    if spec.model_config_path is None:
        return spec.model
    stem = Path(spec.model_config_path).stem
    if spec.model not in (stem, type(spec).model_fields["model"].default):
        raise ValueError(
            f"annotator {spec.name!r}: model {spec.model!r} does not match model_config_path "
            f"{spec.model_config_path} (open_clip registers a config under its file name, {stem!r}); "
            f"set model: {stem} or leave model out"
        )
    return stem


def model_config(spec: ClipAnnotatorSpec) -> dict[str, Any]:
    """The open_clip model config of an annotator spec ({} when open_clip does not know the name)."""
    import open_clip

    if spec.model_config_path is not None:
        return read_model_config(spec.model_config_path)
    return dict(open_clip.get_model_config(spec.model) or {})


def is_sigmoid(cfg: dict[str, Any]) -> bool:
    """A SigLIP-style model: a learned logit bias, trained with a sigmoid loss."""
    return cfg.get("init_logit_bias") is not None


class ClipActor:
    """Per-template zero-shot probabilities for batches of images; a Ray Data ``map_batches`` actor.

    The constructor loads the model and encodes every (template, class) prompt once; each call
    maps ``{"index": (B,), "image": (B, C, H, W) uint8}`` to ``{"index", "probs": (B, T, C) float16}``.
    """

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        templates: Sequence[str],
        class_names: Sequence[str],
        model_config_path: str | None = None,
        logit_scale: float = 100.0,
        precision: str = "fp32",
        use_gpu: bool = False,
        init_seed: int = 0,
    ):
        import open_clip
        import torch

        if use_gpu and not torch.cuda.is_available():
            warnings.warn(
                "GPUs were requested for the CLIP annotator but CUDA is not available here; using the CPU", stacklevel=2
            )
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer, self.preprocess_cfg = load_clip_model(
            model, pretrained, model_config_path, precision, str(self.device), init_seed
        )
        self.input_dtype = open_clip.get_input_dtype(precision) or torch.float32
        self.logit_scale = float(logit_scale)
        self.templates = list(templates)
        self.class_names = list(class_names)
        self.text_encode_calls = 0
        self.text_embeddings = self._encode_texts()  # (T, C, D) float32, unit norm
        bias = getattr(self.model, "logit_bias", None)
        self.sigmoid = bias is not None
        if self.sigmoid:  # SigLIP: the model's own scale and bias (the spec's logit_scale does not apply)
            self.logit_scale = float(self.model.logit_scale.detach().float().exp())
            self.logit_bias = float(bias.detach().float())

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _encode_texts(self) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        self.text_encode_calls += 1
        prompts = [t.format(c) for t in self.templates for c in self.class_names]
        tokens = self.tokenizer(prompts)
        with torch.inference_mode():
            feats = [
                self.model.encode_text(tokens[i : i + TEXT_CHUNK].to(self.device)).float()
                for i in range(0, len(prompts), TEXT_CHUNK)
            ]
        feats = F.normalize(torch.cat(feats), dim=-1)
        return feats.view(self.num_templates, self.num_classes, -1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        if batch["image"].dtype != np.uint8:
            raise ValueError(f"ClipActor expects uint8 images, got {batch['image'].dtype}")
        # Ray hands read-only zero-copy views; torch wants writable memory, so copy the batch once.
        images = torch.from_numpy(np.array(batch["image"], copy=True))
        with torch.inference_mode():
            x = preprocess_images(images.to(self.device, non_blocking=True), self.preprocess_cfg)
            feats = F.normalize(self.model.encode_image(x.to(self.input_dtype)).float(), dim=-1)  # (B, D)
            logits = self.logit_scale * torch.einsum("bd,tcd->btc", feats, self.text_embeddings)
            if self.sigmoid:
                # s / sum(s) with s = sigmoid(logits + b), each class on its own, computed in log space
                probs = F.logsigmoid(logits + self.logit_bias).softmax(dim=-1)  # (B, T, C)
            else:
                probs = logits.softmax(dim=-1)  # (B, T, C)
        return {"index": np.asarray(batch["index"]), "probs": probs.to(torch.float16).cpu().numpy()}


def actor_kwargs(spec: ClipAnnotatorSpec, class_names: Sequence[str]) -> dict[str, Any]:
    """Constructor arguments of :class:`ClipActor` for an annotator spec."""
    from orchestrator.annotation.templates import templates_for

    def absolute(path: str | None) -> str | None:
        # Actors may run in another working directory (or on another node with the same mounts).
        return str(Path(path).expanduser().resolve()) if path is not None else None

    pretrained = spec.pretrained
    if pretrained is not None and _looks_like_path(pretrained):
        pretrained = absolute(pretrained)
    return {
        "model": model_name_for(spec),
        "pretrained": pretrained,
        "model_config_path": absolute(spec.model_config_path),
        "templates": templates_for(spec.templates),
        "class_names": list(class_names),
        "logit_scale": spec.logit_scale,
        "precision": spec.precision,
        "use_gpu": spec.gpus_per_actor > 0,
    }


def _image_blocks(arrays: Sequence[np.ndarray], rows_per_block: int) -> list[Any]:
    """Arrow tables with an ``index`` column (position in the concatenation of ``arrays``) and an
    ``image`` tensor column; one block per batch so that the pool balances at batch granularity."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    tables, offset = [], 0
    for x in arrays:
        for start in range(0, len(x), rows_per_block):
            chunk = np.ascontiguousarray(x[start : start + rows_per_block])
            index = np.arange(offset + start, offset + start + len(chunk), dtype=np.int64)
            tables.append(pa.table({"index": pa.array(index), "image": ArrowTensorArray.from_numpy(chunk)}))
        offset += len(x)
    return tables


def annotate_clip(
    dataset: Dataset,
    spec: ClipAnnotatorSpec,
    class_names: Sequence[str] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-template probabilities of every train and test image: ((N, T, C), (M, T, C)) float16.

    Runs a Ray Data pipeline on the current Ray session (Ray Data starts a local one if there is
    none): ``spec.num_actors`` actors with ``spec.cpus_per_actor`` CPUs and ``spec.gpus_per_actor``
    GPUs each, ``spec.batch_size`` images per call. ``progress(done, total)`` is called on the
    driver after each finished block.
    """
    import ray

    class_names = list(class_names if class_names is not None else dataset.class_names)
    kwargs = actor_kwargs(spec, class_names)
    total = len(dataset.train_x) + len(dataset.test_x)
    ds = ray.data.from_arrow(_image_blocks([dataset.train_x, dataset.test_x], spec.batch_size))
    out = ds.map_batches(
        ClipActor,
        fn_constructor_kwargs=kwargs,
        batch_size=spec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=spec.num_actors),
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor if spec.gpus_per_actor > 0 else None,
        udf_modifying_row_count=False,
    )
    probs = np.empty((total, len(kwargs["templates"]), len(class_names)), dtype=np.float16)
    seen = np.zeros(total, dtype=np.int64)
    done = 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        index = batch["index"]
        probs[index] = batch["probs"]
        seen[index] += 1
        done += len(index)
        if progress is not None:
            progress(done, total)
    if not (seen == 1).all():
        raise RuntimeError(
            f"CLIP annotation returned {int((seen == 0).sum())} missing and {int((seen > 1).sum())} duplicated samples"
        )
    n_train = len(dataset.train_x)
    return probs[:n_train], probs[n_train:]
