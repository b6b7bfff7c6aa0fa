"""What a grid may say about training, importable without torch.

:class:`TrainSettings` (every method's optimisation settings) and :class:`AlgorithmSpec` (a
method's registry entry: its name, hyperparameters dataclass, what it learns from, its ablations)
are all the driver needs to validate a grid, so they live here, apart from the torch code of
:mod:`trainables.api`; a bad grid is refused without importing torch or scikit-learn. The entry
names its algorithm as ``"module:attribute"`` and imports it on the first build (as transformers
keeps a model's configuration apart from its modeling code).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Callable, Literal

from pydantic import Field, PlainValidator

from trainables.data.annotation import Target


PEFT_CHOICES = ("lora", "adapter", "vpt", "bias", "layernorm", "linear_probe", "full")
"""The PEFT modules of the ``clip_peft`` backbone (``trainables/common/peft.py``), in their canonical order."""
PEFT_ALONE = {"linear_probe": "the head alone learns", "full": "every weight of the encoder learns already"}
"""The choices that take no other module, and why."""


def peft_modules(value: Any) -> tuple[str, ...]:
    """The PEFT modules ``training.peft`` names: one name, a list of names or names joined by ``+``
    (how a run records a combination), checked and in canonical order (:data:`PEFT_CHOICES`).
    PartialCLIP combines several modules in one model; ``linear_probe`` and ``full`` stand alone."""
    names = value.split("+") if isinstance(value, str) else value
    allowed = ", ".join(repr(c) for c in PEFT_CHOICES[:-1]) + f" or {PEFT_CHOICES[-1]!r}"
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"Input should be {allowed}, or a non-empty list of them (got {value!r})")
    unknown = [n for n in names if n not in PEFT_CHOICES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a PEFT module: Input should be {allowed}, or a list of them")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} listed twice")
    alone = [n for n in names if n in PEFT_ALONE]
    if alone and len(names) > 1:
        raise ValueError(f"{alone[0]} cannot be combined with other modules ({PEFT_ALONE[alone[0]]}; got {'+'.join(names)})")
    return tuple(sorted(names, key=PEFT_CHOICES.index))


def canonical_peft(value: Any) -> str:
    """``training.peft`` as a run records it: the names of :func:`peft_modules` joined by ``+``
    (``[bias, lora]`` -> ``lora+bias``); one name stays that name, as in the runs before combinations."""
    return "+".join(peft_modules(value))


Peft = Annotated[str, PlainValidator(canonical_peft)]
"""A ``peft`` value of grid.yaml or ``--set``: a name or a list of names, stored canonical."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by every method (grid.yaml ``training:``, overridable per method).

    The types carry the allowed ranges and values: the grid's ``training:`` schema and rerun's
    ``--set`` are both derived from them (``orchestrator/config.py``), so a value is checked the same
    way wherever it enters."""

    epochs: Annotated[int, Field(ge=1, le=100_000)] = 30
    """Total training epochs (warm-up included)."""
    batch_size: Annotated[int, Field(ge=2, le=1_000_000)] = 64
    """Mini-batch size (the papers use 256 on CIFAR)."""
    lr: Annotated[float, Field(gt=0.0)] = 0.05
    """Initial learning rate of SGD."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    """SGD momentum."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    """L2 weight decay."""
    scheduler: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule: ``cosine`` (decay to 0 over ``epochs``) or ``constant``."""
    backbone: Literal["auto", "preact_resnet18", "small_cnn", "mlp", "clip_peft"] = "auto"
    """Backbone name (``preact_resnet18``, ``small_cnn``, ``mlp``), ``clip_peft`` (the annotator's CLIP
    image encoder tuned by ``peft``, its classifier initialised from the class names' text
    embeddings: PartialCLIP) or ``auto`` (the dataset's default)."""
    peft: Peft = "lora"
    """``clip_peft`` only: what of the image encoder is tuned (the head always is): LoRA on the
    attention projections, an AdaptFormer adapter beside each MLP, VPT's prompt tokens, the biases,
    the LayerNorms, nothing (linear probe) or everything (``trainables/common/peft.py``). A list
    (``[lora, vpt, bias]``) combines modules, as PartialCLIP does; the run records it canonical
    (``lora+vpt+bias``). ``linear_probe`` and ``full`` stand alone."""
    lora_rank: Annotated[int, Field(ge=1, le=1024)] = 8
    """``clip_peft`` with ``peft: lora``: rank r of each low-rank update (scale alpha / r = 1)."""
    adapter_dim: Annotated[int, Field(ge=1, le=4096)] = 64
    """``clip_peft`` with ``peft: adapter``: bottleneck width of each AdaptFormer adapter."""
    vpt_tokens: Annotated[int, Field(ge=1, le=1024)] = 10
    """``clip_peft`` with ``vpt``: number of learned prompt tokens (per layer with ``vpt_deep``);
    PartialCLIP's default length is 10."""
    vpt_deep: bool = True
    """``clip_peft`` with ``vpt``: a set of prompts before every transformer layer (VPT-Deep, the
    variant of PartialCLIP's Table 5) or at the input of the first one only (VPT-Shallow)."""
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Fraction of the training pool held out (with candidate labels only) for the label-free objective."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 1
    """Save a Tune checkpoint every this many epochs (and always at the last one)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peft", canonical_peft(self.peft))  # a list, or a config read back

    def signed(self) -> dict[str, Any]:
        """The settings that identify a run: every field, the ``clip_peft`` ones only with that
        backbone and VPT's only with ``vpt`` among the modules (so the signatures of the runs
        without them stay what they were)."""
        out = dataclasses.asdict(self)
        dropped: tuple[str, ...] = ()
        if self.backbone != "clip_peft":
            dropped = CLIP_PEFT_SETTINGS
        elif "vpt" not in self.peft_modules:
            dropped = VPT_SETTINGS
        for name in dropped:
            out.pop(name)
        return out

    @property
    def peft_modules(self) -> tuple[str, ...]:
        """The PEFT modules of ``peft``, in canonical order (``("lora", "vpt", "bias")``)."""
        return peft_modules(self.peft)

    @property
    def uses_clip(self) -> bool:
        return self.backbone == "clip_peft"


CLIP_PEFT_SETTINGS = ("peft", "lora_rank", "adapter_dim", "vpt_tokens", "vpt_deep")
"""The :class:`TrainSettings` fields that apply to the ``clip_peft`` backbone only."""
VPT_SETTINGS = ("vpt_tokens", "vpt_deep")
"""The :class:`TrainSettings` fields that apply with the ``vpt`` module only."""



@dataclass(frozen=True)
class AlgorithmSpec:
    """A registry entry. ``name`` is the single name used everywhere (grid.yaml, file, tags)."""

    name: str
    params: type
    """Frozen dataclass of the method's hyperparameters, with the paper's defaults."""
    builder: str
    """``"module:attribute"`` of the callable ``(params, ctx) -> Algorithm``, imported on the first
    :meth:`build` (the algorithm's module imports torch; its declaration does not)."""
    consumes: Target = Target.CAND
    """What the method learns from (:class:`Target`)."""
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named ablations: each maps to the params overrides that switch a component off."""
    description: str = ""
    needs_clip: bool = False
    """The method runs on the annotator's CLIP (``BuildContext.clip``; CoOp): refused before Ray
    starts for annotators without one."""
    needs_vlm: bool = False
    """The method fine-tunes the annotator's image-text-to-text model (``BuildContext.vlm``;
    ``vlm_lora``): refused before Ray starts for annotators without one."""
    consumes_when: Callable[[Any], Target] | None = None
    """``params -> Target`` for a method whose variants learn from different targets (the starred
    rows: ``starred=True`` -> template average); None: always ``consumes``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "consumes", Target(self.consumes))

    def build(self, params: Any, ctx: Any) -> Any:
        """The algorithm built from ``params`` and a :class:`~trainables.api.BuildContext`."""
        module, _, attribute = self.builder.partition(":")
        return getattr(importlib.import_module(module), attribute)(params, ctx)

    def consumes_for(self, params: Any) -> Target:
        """The target kind for ``params`` (an instance of ``self.params`` or a dict of its fields)."""
        if self.consumes_when is None:
            return self.consumes
        if isinstance(params, dict):
            params = self.params(**params)
        return Target(self.consumes_when(params))


def _starred_target(single: Target, params: Any) -> Target:
    return single.averaged if params.starred else single


def starred_variant(single: Target) -> Callable[[Any], Target]:
    """``consumes_when`` of a method with a starred row (``params.starred``): the template average of
    ``single`` when starred (KD*, DivideMix*), ``single`` otherwise."""
    return partial(_starred_target, single)
