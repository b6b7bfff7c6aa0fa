"""Tiny-data builders shared by the algorithm tests: 8x8 one-channel images, random candidate sets,
and the build context of a small CNN on them."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from trainables.api import BuildContext, TrainData, TrainSettings
from trainables.common.augment import make_views
from trainables.common.backbones import clip_encoder_factory, make_encoder
from trainables.common.clip_model import clip_views, load_source
from trainables.data.clip_source import ClipSource, LoadedClip
from trainables.data.vlm_source import LoadedVlm, VlmSource

TINY_CLIP = Path(__file__).parent / "fixtures" / "tiny_clip.json"


def tiny_images(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) random uint8 images."""
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)


def random_candidates(y: torch.Tensor, num_classes: int, q: float, g: torch.Generator) -> torch.Tensor:
    """(n, C) candidate sets: each class with probability ``q``, the true label ``y`` always."""
    cand = (torch.rand(len(y), num_classes, generator=g) < q).float()
    cand[torch.arange(len(y)), y] = 1.0
    return cand


def tiny_data(
    x: torch.Tensor, cand: torch.Tensor, trusted: torch.Tensor, *, hflip: bool = True, seed: int = 0,
    soft: torch.Tensor | None = None,
) -> TrainData:  # fmt: skip
    """``TrainData`` on ``x``: image views seeded ``seed + 1``, the shuffling generator ``seed + 2``."""
    views = make_views("image", mean=(0.5,), std=(0.25,), hflip=hflip, generator=torch.Generator().manual_seed(seed + 1))
    return TrainData(
        x=x, cand=cand, trusted=trusted, views=views, generator=torch.Generator().manual_seed(seed + 2), soft=soft
    )


def tiny_pll_data(
    n: int, num_classes: int, *, q: float, trusted: int = 0, hflip: bool = True, seed: int = 0
) -> tuple[TrainData, torch.Tensor]:
    """(data, y): random images and candidate sets (data seed 0); the first ``trusted`` samples carry
    the singleton of their true label and are flagged trusted."""
    g = torch.Generator().manual_seed(0)
    x = tiny_images(n, g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    cand = random_candidates(y, num_classes, q, g)
    cand[:trusted] = F.one_hot(y[:trusted], num_classes).float()
    return tiny_data(x, cand, torch.arange(n) < trusted, hflip=hflip, seed=seed), y


def tiny_ctx(
    num_samples: int, num_classes: int, *, epochs: int, batch_size: int, lr: float = 0.05, seed: int = 0,
    clip: LoadedClip | None = None, vlm: LoadedVlm | None = None, **settings,
) -> BuildContext:  # fmt: skip
    """A small CNN on 8x8 one-channel images, on the CPU; with ``backbone="clip_peft"`` (in
    ``settings``) the tiny CLIP ``clip``'s image tower instead. ``clip`` also reaches methods that need it."""
    train = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, **settings)

    def small_cnn():
        return make_encoder("small_cnn", in_channels=1, image_size=8)

    return BuildContext(
        num_classes=num_classes,
        num_samples=num_samples,
        make_encoder=clip_encoder_factory(clip, train) if train.uses_clip else small_cnn,
        train=train,
        device=torch.device("cpu"),
        seed=seed,
        clip=clip,
        vlm=vlm,
    )


def tiny_clip_source(num_classes: int, templates: tuple[str, ...] = ("a photo of a {}",)) -> ClipSource:
    """The tiny random open_clip model of tests/fixtures/tiny_clip.json, as an annotator's CLIP."""
    names = tuple(f"number {i}" for i in range(num_classes))
    return ClipSource("tiny_clip", None, str(TINY_CLIP), templates, names)


@functools.lru_cache(maxsize=4)
def tiny_clip(num_classes: int, templates: tuple[str, ...] = ("a photo of a {}",)) -> LoadedClip:
    """:func:`tiny_clip_source` built (once per process: building it takes seconds)."""
    return load_source(tiny_clip_source(num_classes, templates))


VLM_TEMPLATES = ("What is shown? {classes}. Answer:", "Which of these is it: {classes}?")
"""The tiny VLM's questions in the algorithm tests."""


@functools.lru_cache(maxsize=1)
def tiny_vlm_dir() -> Path:
    """A tiny random LLaVA (tests/fixtures/tiny_vlm.py) written once per process to a temporary directory."""
    import tempfile

    from fixtures.tiny_vlm import build_tiny_llava

    return build_tiny_llava(Path(tempfile.mkdtemp(prefix="tiny_vlm_")) / "model")


def tiny_vlm_source(num_classes: int, answer_mode: str = "score") -> VlmSource:
    names = tuple(f"number {i}" for i in range(num_classes))
    return VlmSource(str(tiny_vlm_dir()), None, "fp32", VLM_TEMPLATES, names, answer_mode=answer_mode)


def tiny_vlm(num_classes: int, answer_mode: str = "score") -> LoadedVlm:
    """The tiny LLaVA as an annotator's VLM, freshly loaded (``vlm_lora`` adapts its model in place)."""
    from trainables.common.vlm_model import load_source as load_vlm_source

    return load_vlm_source(tiny_vlm_source(num_classes, answer_mode))


def with_raw_views(data: TrainData, seed: int = 0) -> TrainData:
    """``data`` with views in [0, 1] (a VLM's processor normalises), seeded as ``tiny_data``'s."""
    views = make_views("image", mean=None, std=None, hflip=True, generator=torch.Generator().manual_seed(seed + 1))
    return dataclasses.replace(data, views=views)


def with_clip_views(data: TrainData, clip: LoadedClip, seed: int = 0) -> TrainData:
    """``data`` with CLIP views (augmentations in [0, 1], then the tiny CLIP's transform), seeded as ``tiny_data``'s."""
    base = make_views("image", mean=None, std=None, hflip=True, generator=torch.Generator().manual_seed(seed + 1))
    return dataclasses.replace(data, views=clip_views(base, clip.preprocess_cfg))


def train_with_checkpoints(config, checkpoint: Path) -> list[dict[str, float]]:
    """Run a trial through the real loop (``run_trial``), writing every checkpoint it saves into
    ``checkpoint`` (created); returns the metrics it reported, one dict per epoch."""
    from trainables.loop import run_trial

    checkpoint.mkdir(parents=True, exist_ok=True)
    reported: list[dict[str, float]] = []

    def report(metrics: dict[str, float], save) -> None:
        reported.append(metrics)
        if save is not None:
            save(checkpoint)

    run_trial(config, report)
    return reported


def annotated_trial(tmp: Path, grid: dict, stage: Any, annotate_fn: str, outputs: Callable) -> tuple:
    """A finished trial of the one-cell ``grid`` through the real loop, its annotation made by the
    real stage with the model's outputs stood in for (``stage.annotate_fn`` replaced by ``outputs``):
    (trial config, reported metrics, checkpoint directory, the driver's data set)."""
    import pytest

    from orchestrator.annotation.stage import annotate
    from orchestrator.config import parse_grid
    from orchestrator.plan import expand
    from orchestrator.student import driver_dataset
    from trainables.data.datasets import load_dataset

    study = expand(parse_grid({"experiment": "trial", "storage": str(tmp), **grid}))[0]
    dataset = load_dataset(study.cell.dataset)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, annotate_fn, outputs)
        ann = annotate(dataset, study.cell.annotator, cache_dir=tmp / "annotations")
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp / "annotations"), cpus=1, device="cpu")
    checkpoint = tmp / "checkpoint"
    reported = train_with_checkpoints(config, checkpoint)
    return config, reported, checkpoint, driver_dataset(config)
