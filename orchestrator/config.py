"""grid.yaml: a typed, strict schema, validated entirely before Ray starts.

``load_grid(path)`` parses and validates a grid file and raises :class:`GridError` with one line per
problem, each naming the key (``methods[0].params.tau_div``) and what is allowed. Everything that
can be checked without running anything is checked here: unknown keys, types, ranges, unknown
dataset / annotator / method names, method parameter overrides against the method's dataclass,
search-space overrides against the method's space, axes that do not apply to any annotator, and
methods that need an annotation the annotator cannot give.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from trainables.settings import VPT_SETTINGS, TrainSettings
from trainables.data.datasets import DATASETS
from trainables.data.spec import DatasetSpec, Strict, did_you_mean

OBJECTIVES = {"val/covering_rate": "max", "val/partial_loss": "min"}


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
"""URI schemes of MLflow tracking stores (a plain path, no scheme, is a local file store too)."""


class GridError(ValueError):
    """A grid file is invalid. The message lists every problem found, one per line."""


class SyntheticAnnotatorSpec(Strict):
    kind: Literal["synthetic"]
    name: str = "synthetic"
    generator: Literal["flip", "pico_plus", "uniform", "instance_dependent"] = "flip"
    """``flip``: ALIM's (exact eta, E|S| = 1 + q(C-1)); ``pico_plus``: PiCO+'s (diagonal 1 - eta,
    off-diagonal q, empty rows redrawn: realised eta below eta); ``uniform``: uniform set sampling
    (no q; E|S| = C/2), then flip's eta step; ``instance_dependent``: VALEN's rule from a cross-fitted
    helper model's probabilities, q the rate, then an eta step drawn by those probabilities
    (``orchestrator/annotation/synthetic.py``)."""
    confidences: Union[Literal["helper"], "ClipAnnotatorSpec"] = "helper"
    """``instance_dependent`` only: whose class probabilities the sets follow. ``helper``: a logistic
    regression cross-fitted on the training pool's clean labels; a CLIP annotator's entry
    (``{kind: clip, ...}``): its template-averaged probabilities (annotated and cached as that
    annotator's own annotation)."""

    @field_validator("confidences", mode="before")
    @classmethod
    def _helper_or_clip(cls, value: Any) -> Any:
        if value != "helper" and not (isinstance(value, dict) and value.get("kind") == "clip") and not isinstance(value, BaseModel):
            raise ValueError(f"`helper` or a CLIP annotator entry ({{kind: clip, ...}}), got {value!r}")
        return value

    @model_serializer(mode="wrap")
    def _omit_default_confidences(self, handler: Any) -> dict[str, Any]:
        """Left out when ``helper``, so that the cells of grids without it keep their signatures."""
        return {k: v for k, v in handler(self).items() if not (k == "confidences" and v == "helper")}

    @model_validator(mode="after")
    def _confidences_only_for_instance_dependent(self) -> "SyntheticAnnotatorSpec":
        if self.confidences != "helper" and self.generator != "instance_dependent":
            raise ValueError(f"confidences: applies only to the instance_dependent generator, not to {self.generator}")
        return self


class ClipAnnotatorSpec(Strict):
    kind: Literal["clip"]
    name: str = "clip"
    model: str = "ViT-B-32"
    """open_clip model name (``open_clip.list_models()``)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag, a hub id, or a local checkpoint path; None = random weights."""
    model_config_path: str | None = None
    """Path to an open_clip model config JSON, for models open_clip does not know by name."""
    templates: Union[Literal["paper27", "openai80"], tuple[str, ...]] = "paper27"
    """Prompt templates: the paper's 27, CLIP's 80, or an explicit list with one ``{}`` each."""
    class_names: tuple[str, ...] | None = None
    """Override the data set's class descriptions (one per class, in label order)."""
    candidate_mode: Literal["multi_prompt", "top_k", "prob_ratio"] = "multi_prompt"
    top_k: int = Field(default=2, ge=1)
    prob_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    single_template: int = Field(default=0, ge=0)
    """Index of the template whose argmax is the single noisy label (0: "a photo of a {}")."""
    logit_scale: float = Field(default=100.0, gt=0.0)
    batch_size: int = Field(default=128, ge=1)
    num_actors: int = Field(default=1, ge=1)
    gpus_per_actor: float = Field(default=0.0, ge=0.0)
    cpus_per_actor: float = Field(default=1.0, gt=0.0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    @field_validator("templates", "class_names", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        """YAML and JSON give lists; the grid is validated strictly, which takes only tuples."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: Any) -> Any:
        if isinstance(templates, tuple):
            if not templates:
                raise ValueError("templates must not be empty")
            bad = [t for t in templates if t.count("{}") != 1]
            if bad:
                raise ValueError(f"each template needs exactly one '{{}}' for the class name; bad: {bad}")
        return templates


SyntheticAnnotatorSpec.model_rebuild()


class VlmAnnotatorSpec(Strict):
    """An image-text-to-text model (LLaVA-style) asked a question per template that lists the class
    names as choices (Co-Reg, extended paper, section III), through transformers' auto classes."""

    kind: Literal["vlm"]
    name: str = "vlm"
    model: str = "llava-hf/llava-1.5-7b-hf"
    """Hugging Face hub id, or a local directory holding the model and its processor."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id; part of the cache key."""
    templates: Union[Literal["paper_choices", "lettered", "single"], tuple[str, ...]] = "paper_choices"
    """Question templates: a named set, or a list using ``{classes}`` and/or ``{options}``."""
    class_names: tuple[str, ...] | None = None
    """Override the data set's class names (one per class, in label order)."""
    answer_mode: Literal["generate", "score"] = "generate"
    """``generate``: greedy answer parsed back to a class; ``score``: per-template class
    probabilities from the likelihood of each class name as the answer."""
    max_new_tokens: int = Field(default=16, ge=1, le=256)
    """Bound on the generated answer (``generate``)."""
    candidate_mode: Literal["multi_prompt", "top_k", "prob_ratio"] = "multi_prompt"
    """How ``score`` probabilities become candidate sets (``generate``: the union of parsed answers)."""
    top_k: int = Field(default=2, ge=1)
    prob_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    single_template: int = Field(default=0, ge=0)
    """Template of the single noisy label and of the ``zero-shot`` row."""
    batch_size: int = Field(default=8, ge=1)
    num_actors: int = Field(default=1, ge=1)
    gpus_per_actor: float = Field(default=0.0, ge=0.0)
    cpus_per_actor: float = Field(default=1.0, gt=0.0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """``transformers``: the auto classes on a Ray Data actor pool (both answer modes, CPU or GPU).
    ``vllm``: Ray Data's LLM processor with a vLLM engine (``generate`` only, GPUs, vLLM installed).
    ``auto``: vLLM when it is installed, the annotator asks for GPUs and answers by ``generate``;
    else transformers (:meth:`engine_to_run`; ``--dry-run`` prints the choice)."""

    @field_validator("templates", "class_names", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: Any) -> Any:
        from orchestrator.annotation.templates import vlm_templates_for

        if isinstance(templates, tuple):
            vlm_templates_for(templates)
        return templates

    @model_validator(mode="after")
    def _engine(self) -> "VlmAnnotatorSpec":
        if self.engine != "vllm":
            return self
        problems = []
        if self.answer_mode == "score":
            problems.append("engine: vllm only generates answers; answer_mode score needs engine transformers (or auto)")
        if self.gpus_per_actor <= 0:
            problems.append("engine: vllm runs on GPUs only; set gpus_per_actor > 0 or use engine transformers")
        elif self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            problems.append(f"engine: vllm takes a fraction of one GPU or a whole number of GPUs (tensor parallel), not gpus_per_actor {self.gpus_per_actor:g}")
        if not vllm_installed():
            problems.append("engine: vllm is not installed here (pip install vllm); use engine transformers or auto")
        if problems:
            raise ValueError("\n".join(problems))  # one line each in the refusal
        return self

    def engine_to_run(self) -> Literal["transformers", "vllm"]:
        """The engine that will annotate: ``engine``, with ``auto`` resolved on this machine."""
        if self.engine == "auto":
            gpu_generate = self.gpus_per_actor > 0 and self.answer_mode == "generate"
            return "vllm" if gpu_generate and vllm_installed() else "transformers"
        return self.engine


def vllm_installed() -> bool:
    """vLLM can be imported here (looked up without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


MemberSpec = Annotated[Union[ClipAnnotatorSpec, VlmAnnotatorSpec], Field(discriminator="kind")]


class EnsembleAnnotatorSpec(Strict):
    """Several CLIP / VLM annotators combined into one annotation (CLIP + LLaVA as one grid axis)."""

    kind: Literal["ensemble"]
    name: str = "ensemble"
    members: tuple[MemberSpec, ...] = Field(min_length=1)
    """The annotators combined (each annotated and cached on its own)."""
    combine: Literal["union", "intersection", "mean_probs"] = "union"
    """Candidate sets: the members' union or intersection (empty: the union), or ``candidate_mode``
    applied to the members' template-averaged probabilities, one member per "template"."""
    candidate_mode: Literal["multi_prompt", "top_k", "prob_ratio"] = "top_k"
    """``mean_probs`` only: ``multi_prompt`` = union of each member's argmax; ``top_k`` /
    ``prob_ratio`` on the mean over members."""
    top_k: int = Field(default=2, ge=1)
    prob_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    single_template: int = Field(default=0, ge=0)
    """Member whose template average gives the single noisy label and the ``zero-shot`` row."""
    prefilter_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    """PartialCLIP's zero-shot pre-filter: keep only candidates among the top ceil(f * C) classes
    of the members' mean zero-shot probabilities (None: off)."""

    @field_validator("members", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value


class GivenAnnotatorSpec(Strict):
    """The candidate sets shipped with the data set (lost, msrcv2: the real annotators' ambiguity).

    Plain PLL: the sets are used as they are. No synthetic noise is put on top (the q / eta axes
    are refused for this kind): for NPLL on these data sets use the synthetic annotator, which
    draws new sets from the true labels."""

    kind: Literal["given"]
    name: str = "given"


AnnotatorSpec = Annotated[
    Union[SyntheticAnnotatorSpec, ClipAnnotatorSpec, VlmAnnotatorSpec, EnsembleAnnotatorSpec, GivenAnnotatorSpec],
    Field(discriminator="kind"),
]


AXIS_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "q": (lambda v: 0.0 <= v <= 1.0, "is outside [0, 1]"),
    "eta": (lambda v: 0.0 <= v < 1.0, "is outside [0, 1)"),
    "shots": (lambda v: v >= 0, "is negative"),
    "unlabeled_fraction": (lambda v: 0.0 < v <= 1.0, "is outside (0, 1]"),
    "seeds": (lambda v: v >= 0, "is negative"),
    "imbalance_ratio": (lambda v: v >= 1.0, "is below 1 (1 = balanced)"),
}


class GridAxes(Strict):
    q: list[float] | None = None
    """Flip probability of each wrong label into S (synthetic annotators only)."""
    eta: list[float] | None = None
    """Probability that the true label is replaced by a wrong one (synthetic annotators only)."""
    shots: list[int] = [0]
    """Number of true labels revealed per class (trusted singletons)."""
    unlabeled_fraction: list[float] = [1.0]
    """Fraction of the unlabeled training pool kept (seeded)."""
    seeds: list[int] = [0]
    imbalance_ratio: list[float] | None = None
    """Long-tailed training pools: every data set once per ratio (1: balanced; see
    ``DatasetSpec.imbalance_ratio``), its column named ``<name>-LT<ratio>``."""

    @model_serializer(mode="wrap")
    def _omit_unset_imbalance(self, handler: Any) -> dict[str, Any]:
        """Left out when unset, so that the sweep signature of a grid without it stays what it was."""
        return {k: v for k, v in handler(self).items() if not (k == "imbalance_ratio" and v is None)}

    @field_validator("q", "eta", "shots", "unlabeled_fraction", "seeds", "imbalance_ratio")
    @classmethod
    def _in_range(cls, values: list | None, info: ValidationInfo) -> list | None:
        inside, message = AXIS_RANGES[info.field_name]
        for v in values or []:
            if not inside(v):
                raise ValueError(f"{info.field_name} = {v} {message}")
        return values

    @field_validator("shots", "unlabeled_fraction", "seeds", "q", "eta", "imbalance_ratio")
    @classmethod
    def _non_empty(cls, values: list | None) -> list | None:
        if values is not None and len(values) == 0:
            raise ValueError("an axis needs at least one value (leave it out to use the default)")
        return values


class _TrainingOverrides(Strict):
    def apply(self, base: TrainSettings) -> TrainSettings:
        return dataclasses.replace(base, **self.model_dump(exclude_none=True))

    @model_serializer(mode="wrap")
    def _omit_unset_vpt(self, handler: Any) -> dict[str, Any]:
        """VPT's settings are left out when unset, so that the study keys and the sweep signature of
        a grid that does not use them stay what they were (resumable sweeps)."""
        return {k: v for k, v in handler(self).items() if not (k in VPT_SETTINGS and v is None)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


TrainingSpec = create_model(
    "TrainingSpec",
    __base__=_TrainingOverrides,
    __doc__="grid.yaml ``training:``: every field of :class:`TrainSettings`, optional, checked by its type.",
    **{name: (Optional[hint], None) for name, hint in _hints(TrainSettings).items()},
)


def check_method_settings(method: str, params: dict[str, Any], training: dict[str, Any], where: str) -> list[str]:
    """One problem line per bad override of ``method``'s params dataclass or of :class:`TrainSettings`
    (unknown name, wrong type, out of range), each named ``<where>.params.<key>`` / ``<where>.training.<key>``.
    The grid and rerun's ``--set`` both check with it."""
    from trainables.registry import ALGORITHMS

    spec = ALGORITHMS[method]
    problems = []
    for section, cls, values in (("params", spec.params, params), ("training", TrainSettings, training)):
        hints = _hints(cls)
        for key, value in values.items():
            if key not in hints:
                allowed = ", ".join(sorted(hints)) or "(none)"
                what = "parameter" if section == "params" else "training setting"
                hint = did_you_mean(key, hints)
                problems.append(f"{where}.{section}.{key}: unknown {what} of {method}{hint}; allowed: {allowed}")
                continue
            try:
                TypeAdapter(hints[key]).validate_python(value, strict=isinstance(value, str) or None)
            except ValidationError as err:
                msg = err.errors()[0]["msg"].removeprefix("Value error, ")
                problems.append(f"{where}.{section}.{key}: {msg} (got {value!r})")
    if not problems:
        try:  # the dataclass's own checks (__post_init__)
            spec.params(**{**dataclasses.asdict(spec.params()), **params})
        except (TypeError, ValueError) as err:
            problems.append(f"{where}.params: {err}")
    return problems


class AshaSpec(Strict):
    grace_period: int = Field(default=5, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)


class SearchSpec(Strict):
    num_samples: int = Field(default=1, ge=1)
    """Optuna trials per grid cell (the first one evaluates the method's defaults)."""
    objective: str = "val/covering_rate"
    """Label-free metric Optuna optimises; test metrics are refused."""
    space: dict[str, Any] = {}
    """Per-parameter overrides: a value fixes it; ``{low, high, log}`` or ``{choices}`` re-ranges it."""
    asha: AshaSpec | None = None
    """ASHA early stopping within each cell's study (None: every trial runs to the end)."""
    sampler: Literal["tpe", "random"] = "tpe"

    @field_validator("objective")
    @classmethod
    def _objective(cls, name: str) -> str:
        if name.startswith("test/"):
            raise ValueError(f"objective {name!r} uses test labels; test metrics are reported, never optimised")
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}")
        return name

    @property
    def mode(self) -> str:
        return OBJECTIVES[self.objective]


class MethodSpec(Strict):
    name: str
    label: str | None = Field(default=None, min_length=1)
    """Row name in the tables, tag ``label`` and part of the study name (default: ``name``). Lets
    one grid hold variants of a method: ``{name: dividemix, label: dividemix*, params: {starred: true}}``."""
    params: dict[str, Any] = {}
    """Fixed overrides of the method's hyperparameter dataclass."""
    training: TrainingSpec = TrainingSpec()
    search: SearchSpec = SearchSpec()


class ResourcesSpec(Strict):
    cpus_per_trial: float = Field(default=1.0, gt=0.0)
    gpus_per_trial: float = Field(default=0.0, ge=0.0)
    """Fractional values (0.25) pack several trials on one GPU."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """None: as many as the cluster's resources allow."""


class RaySpec(Strict):
    address: str | None = None
    """None starts a local Ray; ``auto`` joins the cluster this machine belongs to."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Local Ray only: CPUs to give it (default: all)."""


class Grid(Strict):
    experiment: str = Field(min_length=1)
    tracking_uri: str | None = None
    """MLflow tracking URI; default ``sqlite:///<storage>/mlflow.db``."""
    storage: str = "./results"
    """Ray results and the annotation cache (a shared file system path on a cluster)."""
    datasets: list[DatasetSpec] = Field(min_length=1)
    annotators: list[AnnotatorSpec] = Field(min_length=1)
    grid: GridAxes = GridAxes()
    training: TrainingSpec = TrainingSpec()
    methods: list[MethodSpec] = Field(min_length=1)
    resources: ResourcesSpec = ResourcesSpec()
    max_retries: int = Field(default=1, ge=0)
    """Times a trial that raises is retried from its last checkpoint before it counts as failed."""
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _unique_names(self) -> "Grid":
        for what, names in (
            ("annotators", [a.name for a in self.annotators]),
            ("datasets", [d.display if d.split is None else f"{d.display} split {d.split}" for d in self.datasets]),
            ("methods", [m.label or m.name for m in self.methods]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate name(s) {dupes}; give each entry a distinct name (methods and datasets: a distinct label)")
        return self

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str | None) -> str | None:
        scheme = urlsplit(uri).scheme if uri is not None else ""
        if uri is not None and scheme and scheme not in TRACKING_SCHEMES:
            raise ValueError(f"tracking_uri scheme {scheme!r} is not one MLflow serves; allowed: {', '.join(TRACKING_SCHEMES)}, or a path")
        return uri

    @property
    def storage_path(self) -> Path:
        return Path(self.storage).expanduser().resolve()

    @property
    def artifact_location(self) -> str | None:
        """Local stores keep artifacts beside the database; a tracking server decides for itself."""
        if self.tracking_uri is None or self.tracking_uri.startswith(("sqlite:", "file:")):
            return (self.storage_path / "mlartifacts").as_uri()
        return None

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.storage_path / 'mlflow.db'}"


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ANNOTATOR_KINDS and out.endswith("]"):
            continue  # discriminated-union tag: the kind is already in the message
        else:
            out += f".{part}" if out else str(part)
    return out


ANNOTATOR_KINDS = {
    "synthetic": SyntheticAnnotatorSpec, "clip": ClipAnnotatorSpec, "given": GivenAnnotatorSpec, "vlm": VlmAnnotatorSpec,
    "ensemble": EnsembleAnnotatorSpec,
}  # fmt: skip


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (``list[X]``, ``X | None``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_at(loc: tuple) -> list[str]:
    """The keys allowed in the mapping that holds the key at ``loc`` (for "did you mean")."""
    model: type[BaseModel] | None = Grid
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in ANNOTATOR_KINDS:
            model = ANNOTATOR_KINDS[part]
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def _format(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(str(e["loc"][-1]), _keys_at(e["loc"]))
        elif e["type"] == "union_tag_invalid":
            kinds = "clip, vlm (members of an ensemble)" if "members" in e["loc"] else ", ".join(ANNOTATOR_KINDS)
            msg = f"unknown annotator kind {e['input'].get('kind')!r}; allowed: {kinds}" if isinstance(e["input"], dict) else msg
        elif e["type"] == "union_tag_not_found":
            msg = f"missing 'kind' (allowed: {', '.join(ANNOTATOR_KINDS)})"
        parts = msg.split("\n") if e["type"] == "value_error" else [msg]  # a validator's several problems, one per line
        lines += [f"{_loc(e['loc'])}: {part}" for part in parts]
    return lines


def gives_probabilities(ann: Any) -> bool:
    """The annotator gives per-template class probabilities (noisy labels, soft labels, zero-shot*)."""
    if ann.kind == "ensemble":
        return all(gives_probabilities(m) for m in ann.members)
    return ann.kind == "clip" or (ann.kind == "vlm" and ann.answer_mode == "score")


def _template_problems(where: str, ann: Any) -> list[str]:
    """``single_template`` against the templates (an ensemble's: its members), recursively."""
    from orchestrator.annotation.templates import templates_for, vlm_templates_for

    if ann.kind == "ensemble":
        problems = [p for j, m in enumerate(ann.members) for p in _template_problems(f"{where}.members[{j}]", m)]
        if ann.single_template >= len(ann.members):
            problems.append(f"{where}.single_template: {ann.single_template} >= number of members ({len(ann.members)})")
        probs = [gives_probabilities(m) for m in ann.members]
        if ann.combine == "mean_probs" and not all(probs):
            problems.append(f"{where}.combine: mean_probs needs probabilities from every member (clip, or vlm with answer_mode score)")
        if ann.prefilter_fraction is not None and not any(probs):
            problems.append(f"{where}.prefilter_fraction: needs a member with probabilities (clip, or vlm with answer_mode score)")
        return problems
    if ann.kind not in ("clip", "vlm"):
        return []
    n = len((templates_for if ann.kind == "clip" else vlm_templates_for)(ann.templates))
    return [f"{where}.single_template: {ann.single_template} >= number of templates ({n})"] if ann.single_template >= n else []


def _check_semantics(grid: Grid) -> list[str]:
    """Cross-field checks that need the registries (methods, their params and spaces)."""
    from orchestrator.annotation.synthetic import USES_Q

    problems = []
    kinds = {a.kind for a in grid.annotators}
    generators = sorted({a.generator for a in grid.annotators if isinstance(a, SyntheticAnnotatorSpec)})
    for axis in ("q", "eta"):
        used = bool(generators) and (axis == "eta" or any(g in USES_Q for g in generators))
        if getattr(grid.grid, axis) is not None and "synthetic" not in kinds:
            problems.append(
                f"grid.{axis}: applies only to synthetic annotators, and this grid has none "
                f"(annotators: {', '.join(a.name for a in grid.annotators)})"
            )
        elif getattr(grid.grid, axis) is not None and not used:
            problems.append(f"grid.q: the {', '.join(generators)} generator has no q (generators with one: {', '.join(sorted(USES_Q))})")
        if getattr(grid.grid, axis) is None and used:
            problems.append(f"grid.{axis}: required by the synthetic annotator (a list of values)")
    for i, ann in enumerate(grid.annotators):
        problems += _template_problems(f"annotators[{i}]", ann)
        for ds in grid.datasets:
            info = DATASETS[ds.name]
            if ann.kind == "given" and not info.has_candidates:
                shipped = ", ".join(n for n, d in DATASETS.items() if d.has_candidates)
                problems.append(
                    f"annotators[{i}] ({ann.name!r}, kind given): dataset {ds.name} ships no candidate sets "
                    f"(data sets that do: {shipped}); use a synthetic or clip annotator for it"
                )
            if ann.kind in ("clip", "vlm", "ensemble") and info.kind != "image":
                problems.append(f"annotators[{i}] ({ann.name!r}, kind {ann.kind}): dataset {ds.name} has {info.kind}, not images")
            if isinstance(ann, SyntheticAnnotatorSpec) and ann.confidences != "helper" and info.kind != "image":
                problems.append(f"annotators[{i}].confidences: a CLIP annotator, and dataset {ds.name} has {info.kind}, not images")
    if grid.grid.imbalance_ratio is not None:
        for i, ds in enumerate(grid.datasets):
            if ds.imbalance_ratio is not None:
                problems.append(f"datasets[{i}].imbalance_ratio: set both here and as the grid.imbalance_ratio axis; use one")
    training = grid.training.apply(TrainSettings())
    return problems + _check_methods(grid.methods, grid.annotators, training) + _foundation_problems(grid)


def _space_problems(where: str, hint: Any, value: Any) -> list[str]:
    """A search-space override (a fixed value, ``{low, high, log}`` or ``{choices}``) checked against
    the parameter's declared type and range, as the grid's own values are."""
    if isinstance(value, dict) and not set(value) <= {"low", "high", "log", "choices"}:
        return [f"{where}: allowed keys are low, high, log, choices (got {sorted(value)})"]
    if not isinstance(value, dict):
        named = {"value": value}
    elif "choices" in value:
        if not isinstance(value["choices"], list) or not value["choices"]:
            return [f"{where}.choices: a non-empty list of values"]
        named = {f"choices[{i}]": v for i, v in enumerate(value["choices"])}
    else:
        named = {k: value[k] for k in ("low", "high") if k in value}
    problems = []
    for name, v in named.items():
        try:
            TypeAdapter(hint).validate_python(v, strict=isinstance(v, str) or None)
        except ValidationError as err:
            label = where if name == "value" else f"{where}.{name}"
            problems.append(f"{label}: {err.errors()[0]['msg']} (got {v!r})")
    low, high = named.get("low"), named.get("high")
    if not problems and low is not None and high is not None and low > high:
        problems.append(f"{where}: low {low!r} > high {high!r}")
    return problems


def has_clip(ann: Any) -> bool:
    """The annotator has a CLIP a trial can learn on: a CLIP annotator, or an ensemble with a CLIP member."""
    return ann.kind == "clip" or (ann.kind == "ensemble" and any(m.kind == "clip" for m in ann.members))


def _foundation_problems(grid: Grid) -> list[str]:
    """Each method or backbone that learns on the annotator's CLIP (CoOp, ``clip_peft``) or VLM
    (``vlm_lora``) against the annotators, and the few-shot methods' shots against the ``shots`` axis."""
    from trainables.registry import ALGORITHMS

    problems = []
    for i, method in enumerate(grid.methods):
        if method.name in ALGORITHMS:  # an unknown name is reported with the methods' problems
            problems += _method_clip_problems(grid, f"methods[{i}]", method, ALGORITHMS[method.name].needs_clip)
            if ALGORITHMS[method.name].needs_vlm:
                problems += _method_vlm_problems(grid, f"methods[{i}]", method)
    return problems


def has_vlm(ann: Any) -> bool:
    """The annotator has an image-text-to-text model a trial can fine-tune: a VLM annotator, or an ensemble with one."""
    return ann.kind == "vlm" or (ann.kind == "ensemble" and any(m.kind == "vlm" for m in ann.members))


def _method_vlm_problems(grid: Grid, where: str, method: MethodSpec) -> list[str]:
    """A method that fine-tunes the annotator's VLM (``vlm_lora``) against the annotators and the shots."""
    problems = [
        f"{where}.name: {method.name} fine-tunes the annotator's VLM, and the {ann.kind} annotator {ann.name!r} "
        "has none (use a vlm annotator, or an ensemble with a vlm member)"
        for ann in grid.annotators
        if not has_vlm(ann)
    ]
    if 0 in grid.grid.shots:
        problems.append(f"{where}.name: {method.name} trains on the revealed few shots only; grid.shots holds 0 (give 1, 2, 4, ...)")
    return problems


def _method_clip_problems(grid: Grid, where: str, method: MethodSpec, needs_clip: bool) -> list[str]:
    training = method.training.apply(grid.training.apply(TrainSettings()))
    what = method.name if needs_clip else f"{method.name} on the clip_peft backbone"
    problems = []
    if needs_clip or training.uses_clip:
        for ann in grid.annotators:
            if not has_clip(ann):
                problems.append(
                    f"{where}.name: {what} learns on the annotator's CLIP, and the {ann.kind} annotator "
                    f"{ann.name!r} has none (use a clip annotator, or an ensemble with a clip member)"
                )
    if needs_clip and 0 in grid.grid.shots:
        problems.append(f"{where}.name: {method.name} trains on the revealed few shots only; grid.shots holds 0 (give 1, 2, 4, ...)")
    return problems


def _check_methods(
    methods: list[MethodSpec], annotators: list[AnnotatorSpec], training: TrainSettings | None = None
) -> list[str]:
    """Each method: its name, params overrides, target kind against the annotators, search space
    (``training``: the grid's settings, under the method's own; its backbone can widen the space)."""
    from search_spaces import parameter_names
    from trainables.registry import ALGORITHMS

    problems = []
    train_fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for i, m in enumerate(methods):
        where = f"methods[{i}]"
        if m.name == "zero_shot":
            problems.append(f"{where}.name: zero_shot is not a method; every VLM-annotated column of the tables has its zero-shot rows, from the annotation")
            continue
        if m.name not in ALGORITHMS:
            hint = did_you_mean(m.name, ALGORITHMS)
            problems.append(f"{where}.name: unknown method {m.name!r}{hint}; allowed: {', '.join(sorted(ALGORITHMS))}")
            continue
        spec = ALGORITHMS[m.name]
        fields = {f.name for f in dataclasses.fields(spec.params)}
        problems += check_method_settings(m.name, m.params, {}, where)
        try:  # the target kind may depend on the params (starred variants)
            consumes = spec.consumes_for({**dataclasses.asdict(spec.params()), **m.params})
        except (TypeError, ValueError):  # an invalid override, reported above
            consumes = spec.consumes
        if consumes.from_vlm:
            for ann in annotators:
                if not gives_probabilities(ann):
                    hint = {"vlm": " (answer_mode generate; use score)", "ensemble": " (a member gives no probabilities)"}
                    what = f"{ann.kind} annotator {ann.name!r}" + hint.get(ann.kind, "")
                    problems.append(f"{where}.name: {m.name} learns from {consumes.value}, which the {what} does not produce")
        try:
            asked = parameter_names(m.name, training=m.training.apply(training or TrainSettings()))
        except KeyError as err:
            problems.append(f"{where}.search: {err.args[0]}")
            continue
        hints = {**_hints(TrainSettings), **_hints(spec.params)}
        for key, value in m.search.space.items():
            if key not in asked:
                problems.append(
                    f"{where}.search.space.{key}: not a parameter of the {m.name} search space{did_you_mean(key, asked)}; "
                    f"allowed: {', '.join(asked)}"
                )
            elif key in hints:
                problems += _space_problems(f"{where}.search.space.{key}", hints[key], value)
        for key in asked:
            if key not in fields and key not in train_fields:
                problems.append(f"{where}.search: space parameter {key!r} is neither a {m.name} parameter nor a training setting")
        problems += _choice_problems(where, m, training)
    return problems


def _choice_problems(where: str, m: MethodSpec, training: TrainSettings | None) -> list[str]:
    """A value the grid sets (``params``) for a parameter the search draws from a list of choices
    must be one of them: the study's first trial runs the grid's values, and Optuna refuses one
    outside its list once the trial has started."""
    from search_spaces import parameter_choices

    try:
        choices = parameter_choices(m.name, m.search.space, m.training.apply(training or TrainSettings()))
    except (KeyError, TypeError, ValueError):  # a bad space override, reported above
        return []
    return [
        f"{where}.params.{key}: {value!r} is not among the values its search space draws ({choices[key]}); "
        f"fix it for the search too (search.space: {{{key}: {value!r}}}) or add it to search.space.{key}.choices"
        for key, value in m.params.items()
        if key in choices and value not in choices[key]
    ]


def _method_problems_of_raw(raw: dict[str, Any]) -> list[str]:
    """When the schema refuses a grid elsewhere, the methods' own problems (names, params, search
    spaces) are found too, so that one refusal lists them all: checked on the ``methods:`` section
    alone if it passes the schema (with the annotators when they do)."""
    try:
        methods = TypeAdapter(list[MethodSpec]).validate_python(raw.get("methods"), strict=True)
    except ValidationError:
        return []  # the schema's message already names these
    try:
        annotators = TypeAdapter(list[AnnotatorSpec]).validate_python(raw.get("annotators"), strict=True)
    except ValidationError:
        annotators = []
    try:
        training = TrainingSpec.model_validate(raw.get("training", {}), strict=True).apply(TrainSettings())
    except ValidationError:
        training = TrainSettings()
    return _check_methods(methods, annotators, training)


def parse_grid(raw: Any, source: str = "grid") -> Grid:
    """Validate an already-parsed grid (a dict). Raises :class:`GridError` naming every problem."""
    if not isinstance(raw, dict):
        raise GridError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        grid = Grid.model_validate(raw, strict=True)  # never reads "0.05" as 0.05, or 2.0 as an int
    except ValidationError as err:
        problems = _format(err) + _method_problems_of_raw(raw)
        raise GridError(f"{source} is invalid:\n  " + "\n  ".join(problems)) from None
    problems = _check_semantics(grid)
    if problems:
        raise GridError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return grid


MAX_YAML_NODES = 100_000
"""Nodes a grid file may expand to, aliases followed (a 2 KB "billion laughs" file would exhaust memory)."""
MAX_YAML_DEPTH = 40


class GridLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats without a dot (``1e-3``; YAML 1.1 reads
    them as strings)."""


GridLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_size(node: yaml.Node, where: str) -> None:
    """Refuse a document whose alias-expanded size or nesting passes the budgets, before it is built."""
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise GridError(f"{where}: the document expands to more than {MAX_YAML_NODES} nodes (aliases included)")
        if depth > MAX_YAML_DEPTH:
            raise GridError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((part, depth + 1) for pair in node.value for part in pair)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``: UTF-8, sizes bounded, YAML 1.2 floats; :class:`GridError` otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise GridError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        loader = GridLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_size(node, str(path))
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file")
    return parse_grid(read_yaml(path), str(path))
