"""The algorithm contract, checked for every registered algorithm on tiny random data."""

from __future__ import annotations

import dataclasses
import importlib
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from helpers import random_candidates, tiny_clip, tiny_ctx, tiny_data, tiny_images, tiny_vlm, with_clip_views, with_raw_views
from trainables.api import Algorithm, AlgorithmSpec, Target, TrainData, TrainSettings
from trainables.registry import ALGORITHMS, get

N, C, EPOCHS = 64, 4, 3
FAST = {"warmup_epochs": 1, "contrastive_start": 0, "queue_size": 128, "rampup_epochs": 1, "warmup_steps": 0}
"""Overrides that make any method reach its main phase within EPOCHS (applied where a field exists)."""


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0, spec: AlgorithmSpec | None = None) -> TrainData:
    """The tiny data; with CLIP views for a method that learns on the annotator's CLIP (CoOp), in
    [0, 1] for one that fine-tunes the annotator's VLM (its processor normalises)."""
    data = _cnn_data(seed)
    if spec is not None and spec.needs_vlm:
        return with_raw_views(data, seed)
    return with_clip_views(data, tiny_clip(C), seed) if spec is not None and spec.needs_clip else data


def _cnn_data(seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(0)
    x = tiny_images(N, g)
    y = torch.randint(0, C, (N,), generator=g)
    cand = random_candidates(y, C, 0.3, g)
    flipped = torch.arange(N) % 8 == 7  # a few noisy sets: the true label is replaced by another class
    cand[flipped, y[flipped]] = 0.0
    cand[flipped, (y[flipped] + 1) % C] = 1.0
    trusted = torch.arange(N) < 4
    cand[trusted] = F.one_hot(y[trusted], C).float()
    soft = torch.softmax(2 * torch.randn(N, C, generator=g), dim=1)  # annotator probabilities (kd)
    return tiny_data(x, cand, trusted, hflip=True, seed=seed, soft=soft)


def _build(spec: AlgorithmSpec, seed: int = 0) -> Algorithm:
    fields = {f.name for f in dataclasses.fields(spec.params)}
    params = spec.params(**{k: v for k, v in FAST.items() if k in fields})
    clip = tiny_clip(C) if spec.needs_clip else None
    vlm = tiny_vlm(C) if spec.needs_vlm else None
    return spec.build(params, tiny_ctx(N, C, epochs=EPOCHS + 1, batch_size=16, seed=seed, clip=clip, vlm=vlm))


def _outputs(spec: AlgorithmSpec, algo: Algorithm, probe: torch.Tensor) -> torch.Tensor:
    return algo.predict(probe)


def _modules(obj: Any, depth: int = 3) -> list[torch.nn.Module]:
    """Every network an algorithm holds (attributes, lists, dicts, helper objects), each once."""
    found: dict[int, torch.nn.Module] = {}

    def walk(value: Any, level: int) -> None:
        if isinstance(value, torch.nn.Module):
            found.setdefault(id(value), value)
        elif level and isinstance(value, (list, tuple)):
            for item in value:
                walk(item, level - 1)
        elif level and isinstance(value, dict):
            for item in value.values():
                walk(item, level - 1)
        elif level and hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            for item in vars(value).values():
                walk(item, level - 1)

    walk(obj, depth)
    return list(found.values())


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality of two state dicts (tensors bit-identical)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def trained(request):
    """(spec, algorithm after EPOCHS epochs, metrics of every epoch, predictions before training)."""
    spec = ALGORITHMS[request.param]
    algo = _build(spec)
    data = _data(spec=spec)
    probe = data.views.plain(data.x[:8])
    before = _outputs(spec, algo, probe).clone()
    history = [algo.train_epoch(data, epoch) for epoch in range(EPOCHS)]
    return spec, algo, history, before, probe


def test_satisfies_the_protocol(trained):
    spec, algo, *_ = trained
    assert isinstance(algo, Algorithm)
    assert isinstance(spec.consumes, Target) and isinstance(spec.consumes_for(spec.params()), Target)
    assert dataclasses.is_dataclass(spec.params) and spec.params.__dataclass_params__.frozen


def test_losses_are_finite_and_keyed_train(trained):
    spec, _, history, *_ = trained
    for metrics in history:
        assert metrics and "train/loss" in metrics
        for key, value in metrics.items():
            assert key.startswith("train/"), key
            assert math.isfinite(value), (key, value)


def test_training_changes_the_predictions(trained):
    spec, algo, _, before, probe = trained
    after = algo.predict(probe)
    assert after.shape == (8, C)
    assert not torch.allclose(before, after)


def test_pseudo_labels_and_clean_mask(trained):
    _, algo, *_ = trained
    labels = algo.pseudo_labels()
    assert labels.shape == (N, C)
    assert (labels >= 0).all()
    torch.testing.assert_close(labels.sum(dim=1), torch.ones(N))
    mask = algo.clean_mask()
    assert mask is None or (mask.shape == (N,) and mask.dtype == torch.bool)


def test_checkpoint_round_trip_restores_everything(trained):
    spec, algo, *_ = trained
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = _build(spec, seed=123)  # different initial weights: the load must overwrite them
    restored.load_state_dict(torch.load(buffer))

    probe = _data(spec=spec).views.plain(_data().x)
    assert torch.equal(_outputs(spec, algo, probe), _outputs(spec, restored, probe))
    assert torch.equal(algo.pseudo_labels(), restored.pseudo_labels())
    mask, restored_mask = algo.clean_mask(), restored.clean_mask()
    assert (mask is None and restored_mask is None) or torch.equal(mask, restored_mask)
    _assert_same(algo.state_dict(), restored.state_dict())

    # resuming is exact: one more epoch with identically seeded data gives identical results
    metrics = algo.train_epoch(_data(seed=7, spec=spec), EPOCHS)
    restored_metrics = restored.train_epoch(_data(seed=7, spec=spec), EPOCHS)
    assert metrics == restored_metrics
    assert torch.equal(_outputs(spec, algo, probe), _outputs(spec, restored, probe))


def _without_gradient(algo: Algorithm, data: TrainData) -> list[str]:
    """Trainable parameters of ``algo`` that get no gradient in one epoch after the fast warm-up."""
    algo.train_epoch(data, 0)  # FAST: the warm-up is one epoch
    params = {id(p): (f"{type(m).__name__}.{n}", p) for m in _modules(algo) for n, p in m.named_parameters()}
    trainable = {k: v for k, v in params.items() if v[1].requires_grad}
    assert trainable, "no trainable network found"
    got: set[int] = set()
    hooks = [p.register_post_accumulate_grad_hook(lambda p: got.add(id(p))) for _, p in trainable.values()]
    try:
        algo.train_epoch(data, 1)
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(where for key, (where, _) in trainable.items() if key not in got)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_trainable_parameter_receives_a_gradient(name):
    """timm's backward test: in one epoch of the main phase every parameter that requires a
    gradient gets one; a parameter that never does is dead weight or a wiring bug."""
    assert _without_gradient(_build(ALGORITHMS[name]), _data(spec=ALGORITHMS[name])) == []


def test_the_gradient_check_finds_a_parameter_that_gets_none():
    algo = _build(ALGORITHMS["cc"])
    algo.unused_head = torch.nn.Linear(4, C)  # held, never in the loss
    assert _without_gradient(algo, _data()) == ["Linear.bias", "Linear.weight"]


def test_ablations_name_existing_fields(trained):
    spec, *_ = trained
    for name, overrides in spec.ablations.items():
        spec.params(**overrides)  # raises TypeError on an unknown field
        assert overrides, name


class _RecordingSpace:
    """Stands in for search_spaces.Space: records each range and answers with the given values."""

    def __init__(self, answers: dict[str, Any]):
        self.answers, self.ranges = answers, {}

    def float(self, name, low, high, *, log=False):
        self.ranges[name] = (low, high)
        return self.answers[name]

    int = float

    def categorical(self, name, choices):
        self.ranges[name] = tuple(choices)
        return self.answers[name]


def test_search_space_contains_the_defaults(trained):
    """The first trial of a study evaluates the resolved defaults: they must lie inside the space."""
    spec, *_ = trained
    module = importlib.import_module(f"search_spaces.{spec.name}")
    defaults = {**dataclasses.asdict(TrainSettings()), **dataclasses.asdict(spec.params())}
    recorder = _RecordingSpace(defaults)
    sampled = module.space(recorder)
    assert set(sampled) == set(recorder.ranges) and sampled
    for name in sampled:
        assert name in defaults, f"{name} is neither a {spec.name} parameter nor a training setting"
        value, bounds = defaults[name], recorder.ranges[name]
        if len(bounds) == 2 and not isinstance(value, (str, bool)):
            assert bounds[0] <= value <= bounds[1], (name, value, bounds)
        else:
            assert value in bounds, (name, value, bounds)


def test_registry_get():
    assert get("coreg") is ALGORITHMS["coreg"]
    assert all(name == spec.name for name, spec in ALGORITHMS.items())
    with pytest.raises(KeyError) as err:
        get("dividemix_typo")
    assert ", ".join(sorted(ALGORITHMS)) in str(err.value)  # every allowed name, sorted


def test_params_declare_their_ranges_and_the_defaults_lie_inside(trained):
    """The params dataclass is the one source of the allowed values (grid, search space, --set)."""
    import typing

    from pydantic import TypeAdapter

    spec, *_ = trained
    hints = typing.get_type_hints(spec.params, include_extras=True)
    for name, hint in hints.items():
        TypeAdapter(hint).validate_python(getattr(spec.params(), name))  # raises on a default outside
        for override in spec.ablations.values():
            if name in override:
                TypeAdapter(hint).validate_python(override[name])
