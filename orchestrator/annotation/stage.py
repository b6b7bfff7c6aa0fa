"""The annotation stage: candidate sets (and labels) for a data set, computed once and cached.

``annotate(dataset, spec, q=..., eta=..., seed=..., cache_dir=...)`` returns an
:class:`Annotation`. The cache entry is keyed by a hash of everything that determines the result
(:func:`annotation_key`), so a grid that revisits the same (data set, annotator, q, eta, seed) cell,
or a rerun, reuses it. Entries are written atomically (a temporary directory renamed into place),
so concurrent writers of one key are safe: the first rename wins and both hold identical content.

Cache layout under ``cache_dir``::

    <key>/                    arrays.npz (cand_train, noisy labels, soft labels) + meta.json
    clip_probs/<probs key>/   arrays.npz (probs_train, probs_test: (N, T, C) float16) + meta.json
    vlm_outputs/<key>/        arrays.npz (score: probs_*; generate: answers_* (N, T) int16) + meta.json

A trial reads its annotation back with :func:`load_cached` (the driver passes it the key).

The CLIP probabilities are the expensive part and do not depend on the candidate mode, so they
have their own key (:func:`clip_probs_key`, which leaves the mode options out): switching
``candidate_mode`` / ``top_k`` / ``prob_ratio`` / ``single_template`` re-derives the sets from
the stored probabilities without running the model. CLIP is deterministic, so the seed is not in
its keys; the synthetic generator's key has q, eta and the seed. The ``given`` annotator returns
the candidate sets shipped with the data set (``Dataset.train_cand``); its key is the data set's
identity, whose fingerprint covers those sets.

The ``vlm`` annotator's outputs (:mod:`orchestrator.annotation.vlm`) are cached the same way under
``vlm_outputs/`` (:func:`vlm_outputs_key`): ``score`` mode stores per-template probabilities and
derives everything as for CLIP; ``generate`` mode stores each template's parsed answer (-1:
unparseable) and a sample of the raw answers in the entry's meta. A generate-mode candidate set is
the union of the parsed answers; a sample whose every answer was unparseable gets the set of all
classes (no information), counted as ``no_answer_frac``.

Ground-truth labels are read only to compute ``Annotation.stats``.
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.annotation import candidates as cands
from orchestrator.annotation import synthetic
from orchestrator.annotation.synthetic import USES_Q, flip_candidates
from orchestrator.annotation.templates import templates_for
from orchestrator.config import (
    ClipAnnotatorSpec,
    EnsembleAnnotatorSpec,
    GivenAnnotatorSpec,
    SyntheticAnnotatorSpec,
    VlmAnnotatorSpec,
)
from trainables.data.annotation import (
    Annotation,
    CorruptEntryError,
    load_cached,
    move_aside,
    read_entry,
    renormalised,
    write_entry,
)
from trainables.data.datasets import Dataset
from trainables.data.spec import signature

CACHE_FORMAT = 3
"""Bump when what an entry holds or how it is computed changes (it is part of every key).
2: CLIP entries also hold ``soft_single_train``. 3: every entry records its arrays' checksums."""

PROBS_FORMAT = 1
"""The same for the CLIP probabilities entries (part of :func:`clip_probs_key`); kept apart so that
a change to the derived arrays does not throw away the expensive probabilities."""

VLM_FORMAT = 1
"""The same for the VLM outputs entries (part of :func:`vlm_outputs_key`)."""

RAW_SAMPLE = 50
"""Raw answers kept per template in a generate-mode entry's meta (the annotation run's artifact)."""

Spec = SyntheticAnnotatorSpec | ClipAnnotatorSpec | VlmAnnotatorSpec | EnsembleAnnotatorSpec | GivenAnnotatorSpec


# --------------------------------------------------------------------------------------------
# Keys


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a checkpoint; (size, mtime) only make the memo notice a changed file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _weights_identity(pretrained: str | None) -> Any:
    """A tag names its weights; a local checkpoint is identified by its content, not its path."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        st = path.stat()
        return {"file_sha256": _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}
    return pretrained


def clip_class_names(dataset: Dataset, spec: ClipAnnotatorSpec | VlmAnnotatorSpec) -> list[str]:
    """The class descriptions the annotator prompts with (the spec's override or the data set's)."""
    names = list(spec.class_names) if spec.class_names is not None else list(dataset.class_names)
    if len(names) != dataset.num_classes:
        raise ValueError(
            f"annotator {spec.name!r}: class_names has {len(names)} entries but {dataset.name} has "
            f"{dataset.num_classes} classes (one description per class, in label order)"
        )
    return names


def clip_probs_key(dataset: Dataset, spec: ClipAnnotatorSpec) -> str:
    """Key of the per-template probabilities: everything that changes them, no candidate options."""
    import open_clip

    from orchestrator.annotation.clip import (
        PREPROCESS_VERSION,
        is_sigmoid,
        model_config,
        model_name_for,
        read_model_config,
    )

    return signature(
        {
            "format": PROBS_FORMAT,
            "kind": "clip_probs",
            "dataset": dataset.identity,
            "model": model_name_for(spec),
            "weights": _weights_identity(spec.pretrained),
            "init_seed": 0 if spec.pretrained is None else None,  # ClipActor's default
            "model_config": read_model_config(spec.model_config_path) if spec.model_config_path else None,
            "templates": templates_for(spec.templates),
            "class_names": clip_class_names(dataset, spec),
            "preprocess": PREPROCESS_VERSION,
            "logit_scale": spec.logit_scale,
            "precision": spec.precision,
            "open_clip": open_clip.__version__,
            # only SigLIP keys carry it, so CLIP keys stay what they were
            **({"scoring": "sigmoid"} if is_sigmoid(model_config(spec)) else {}),
        },
        length=24,
    )


@functools.lru_cache(maxsize=16)
def _directory_identity(path: str, stamp: tuple) -> dict[str, str]:
    """sha256 of every file of a local model directory (weights, configs, tokenizer, processor,
    chat template); ``stamp`` (names, sizes, mtimes) only makes the memo notice a change."""
    return {name: _file_sha256(str(Path(path) / name), size, mtime) for name, size, mtime in stamp}


def vlm_model_identity(model: str, revision: str | None) -> Any:
    """A hub id and revision name a model; a local directory is identified by its files' content."""
    from trainables.common.vlm_model import is_local

    if not is_local(model):
        return {"hub": model, "revision": revision}
    root = Path(model).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return {"files": _directory_identity(str(root), stamp)}


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return "not installed"


def vlm_outputs_key(dataset: Dataset, spec: VlmAnnotatorSpec) -> str:
    """Key of a VLM's per-template outputs: model (and processor) identity, templates, class names,
    answer mode, decoding settings, precision, parser and transformers versions, the engine when it
    is vLLM (and vLLM's version); no candidate options."""
    import transformers

    from trainables.common.answers import PARSER_VERSION
    from orchestrator.annotation.templates import vlm_templates_for

    generate = spec.answer_mode == "generate"
    engine = spec.engine_to_run()
    return signature(
        {
            "format": VLM_FORMAT,
            "kind": "vlm_outputs",
            "dataset": dataset.identity,
            "model": vlm_model_identity(spec.model, spec.revision),
            "templates": vlm_templates_for(spec.templates),
            "class_names": clip_class_names(dataset, spec),
            "answer_mode": spec.answer_mode,
            "decoding": {"greedy": True, "max_new_tokens": spec.max_new_tokens} if generate else None,
            "parser": PARSER_VERSION if generate else None,
            "precision": spec.precision,
            "transformers": transformers.__version__,
            # only a vLLM run adds its engine (keys of the transformers engine are unchanged)
            **({"engine": "vllm", "vllm": _vllm_version()} if engine == "vllm" else {}),
        },
        length=24,
    )


def _check_axes(spec: Spec, q: float | None, eta: float | None, seed: int) -> None:
    if isinstance(spec, SyntheticAnnotatorSpec):
        uses_q = spec.generator in USES_Q
        if eta is None or (q is None) == uses_q:
            needs = "q and eta" if uses_q else "eta and no q"
            raise ValueError(f"annotator {spec.name!r} ({spec.generator}) needs {needs} (got q={q}, eta={eta})")
        if not (0.0 <= (q or 0.0) <= 1.0 and 0.0 <= eta <= 1.0):
            raise ValueError(f"annotator {spec.name!r}: q={q} and eta={eta} must lie in [0, 1]")
        if seed < 0:
            raise ValueError(f"annotator {spec.name!r}: seed={seed} must be >= 0")
    elif q is not None or eta is not None:
        raise ValueError(f"annotator {spec.name!r} ({spec.kind}): q and eta apply only to synthetic annotators")


def annotation_key(
    dataset: Dataset, spec: Spec, *, q: float | None = None, eta: float | None = None, seed: int = 0
) -> str:
    """Hash of everything that determines the annotation (the cache key).

    Synthetic: data set, generator, q, eta, seed. CLIP: the probabilities' key plus the candidate
    options that are in use (``top_k`` only in top_k mode, ``prob_ratio`` only in prob_ratio mode)
    and ``single_template``; not the seed (CLIP is deterministic), not the batch size or resources.
    """
    _check_axes(spec, q, eta, seed)
    if isinstance(spec, SyntheticAnnotatorSpec):
        content: dict[str, Any] = {
            "kind": "synthetic",
            "generator": spec.generator,
            "dataset": dataset.identity,
            "q": None if q is None else float(q),
            "eta": float(eta),
            "seed": int(seed),
        }
        if spec.generator == "instance_dependent":
            c = spec.confidences
            content["confidences"] = c if isinstance(c, str) else {"clip_probs": clip_probs_key(dataset, c)}
    elif isinstance(spec, GivenAnnotatorSpec):
        content = {"kind": "given", "dataset": dataset.identity}
    elif isinstance(spec, EnsembleAnnotatorSpec):
        mean = spec.combine == "mean_probs"
        content = {
            "kind": "ensemble",
            "members": [annotation_key(dataset, m) for m in spec.members],
            "combine": spec.combine,
            "candidate_mode": spec.candidate_mode if mean else None,
            "top_k": spec.top_k if mean and spec.candidate_mode == "top_k" else None,
            "prob_ratio": spec.prob_ratio if mean and spec.candidate_mode == "prob_ratio" else None,
            "single_template": spec.single_template,
            "prefilter_fraction": spec.prefilter_fraction,
        }
    elif isinstance(spec, VlmAnnotatorSpec):
        score = spec.answer_mode == "score"
        content = {
            "kind": "vlm",
            "outputs": vlm_outputs_key(dataset, spec),
            "candidate_mode": spec.candidate_mode if score else "union",
            "top_k": spec.top_k if score and spec.candidate_mode == "top_k" else None,
            "prob_ratio": spec.prob_ratio if score and spec.candidate_mode == "prob_ratio" else None,
            "single_template": spec.single_template,
        }
    else:
        content = {
            "kind": "clip",
            "probs": clip_probs_key(dataset, spec),
            "candidate_mode": spec.candidate_mode,
            "top_k": spec.top_k if spec.candidate_mode == "top_k" else None,
            "prob_ratio": spec.prob_ratio if spec.candidate_mode == "prob_ratio" else None,
            "single_template": spec.single_template,
        }
    return signature({"format": CACHE_FORMAT, **content}, length=24)


# --------------------------------------------------------------------------------------------
# Cache entries


def _versions() -> dict[str, str]:
    import sys

    versions = {"numpy": np.__version__}
    for name in ("torch", "open_clip", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


# --------------------------------------------------------------------------------------------
# Statistics (the only place ground truth is read)


def candidate_stats(cand: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Partial accuracy (true label in S), mean |S| and the realised noise rate eta = 1 - partial acc."""
    partial_acc = float(cand[np.arange(len(labels)), labels].mean())
    return {
        "partial_acc": partial_acc,
        "mean_set_size": float(cand.sum(axis=1).mean()),
        "eta_realised": 1.0 - partial_acc,
    }


def dataset_candidate_stats(dataset: Dataset, cand: np.ndarray) -> dict[str, float]:
    """:func:`candidate_stats` of a labeled data set; of unlabeled images (a flat image folder) only
    what needs no label: the mean set size."""
    if dataset.labeled:
        return candidate_stats(cand, dataset.train_y)
    return {"mean_set_size": float(cand.sum(axis=1).mean()) if len(cand) else float("nan")}


def zero_shot_stats(
    probs_train: np.ndarray, probs_test: np.ndarray, dataset: Dataset, template: int
) -> dict[str, float]:
    """Zero-shot accuracy of one template and of the template average, on train and test (on test
    only for unlabeled training images, and only when a labeled test folder is given)."""
    out = {}
    parts = [("train", probs_train, dataset.train_y)] if dataset.labeled else []
    for split, probs, labels in parts + [("test", probs_test, dataset.test_y)]:
        out[f"zs_acc_{split}"] = (
            float((cands.single_labels(probs, template) == labels).mean()) if len(labels) else float("nan")
        )
        out[f"zs_acc_avg_{split}"] = (
            float((cands.average_labels(probs) == labels).mean()) if len(labels) else float("nan")
        )
    return out


# --------------------------------------------------------------------------------------------


def annotate(
    dataset: Dataset,
    spec: Spec,
    *,
    q: float | None = None,
    eta: float | None = None,
    seed: int = 0,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> Annotation:
    """The annotation of ``dataset`` by ``spec``, from ``cache_dir`` if present, else computed and cached.

    Synthetic annotators need ``q`` and ``eta``; CLIP and given annotators refuse them and ignore ``seed``.
    ``progress(done, total)`` reports CLIP images annotated (not called on a cache hit).
    """
    cache_dir = Path(cache_dir)
    key = annotation_key(dataset, spec, q=q, eta=eta, seed=seed)
    entry = cache_dir / key
    try:
        return _annotate_or_load(dataset, spec, q, eta, seed, key, entry, cache_dir, progress)
    except CorruptEntryError as err:  # rebuilt once; a second failure is not the cache's fault
        aside = move_aside(err.entry)
        warnings.warn(f"{err}; moved aside to {aside.name}, computing it again", stacklevel=2)
        return _annotate_or_load(dataset, spec, q, eta, seed, key, entry, cache_dir, progress)


def _annotate_or_load(
    dataset: Dataset,
    spec: Spec,
    q: float | None,
    eta: float | None,
    seed: int,
    key: str,
    entry: Path,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> Annotation:
    if isinstance(spec, SyntheticAnnotatorSpec):
        if (entry / "meta.json").is_file():
            return load_cached(cache_dir, key)
        probs = None
        if isinstance(spec.confidences, ClipAnnotatorSpec):  # instance_dependent from a CLIP annotator's probabilities
            probs = annotate(dataset, spec.confidences, cache_dir=cache_dir, progress=progress).soft_train
        return _annotate_synthetic(dataset, spec, q, eta, seed, key, entry, probs)
    if isinstance(spec, GivenAnnotatorSpec):
        if (entry / "meta.json").is_file():
            return load_cached(cache_dir, key)
        return _annotate_given(dataset, spec, key, entry)
    if isinstance(spec, EnsembleAnnotatorSpec):
        from orchestrator.annotation.ensemble_stage import annotate_ensemble

        return annotate_ensemble(dataset, spec, key, entry, cache_dir, progress)
    if isinstance(spec, VlmAnnotatorSpec):
        from orchestrator.annotation.vlm_stage import annotate_vlm_cached

        return annotate_vlm_cached(dataset, spec, key, entry, cache_dir, progress)
    return _annotate_clip(dataset, spec, key, entry, cache_dir, progress)


def _record(
    dataset: Dataset, spec: SyntheticAnnotatorSpec | GivenAnnotatorSpec, key: str, entry: Path, cand: np.ndarray, start: float, **extra: Any
) -> Annotation:
    """Write and return the record of an annotator that gives candidate sets only (synthetic, given)."""
    stats = {
        **dataset_candidate_stats(dataset, cand),
        "num_train": float(len(dataset.train_y)),
        "num_test": float(len(dataset.test_y)),
    }
    meta = {
        "key": key,
        "kind": spec.kind,
        "annotator": spec.model_dump(mode="json"),
        "dataset": dataset.identity,
        **extra,
        "stats": stats,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - start,
        "versions": _versions(),
    }
    write_entry(entry, {"cand_train": cand}, meta)
    return Annotation(key=key, cached=False, cand_train=cand, stats=stats, meta=meta)


def _annotate_synthetic(
    dataset: Dataset, spec: SyntheticAnnotatorSpec, q: float, eta: float, seed: int, key: str, entry: Path, probs: np.ndarray | None = None
) -> Annotation:
    if not dataset.labeled:
        raise ValueError(f"annotator {spec.name!r} (synthetic) draws sets from true labels, and {dataset.name} has none")
    start = time.time()
    cand = synthetic_candidates(dataset, spec.generator, q, eta, seed, probs)
    return _record(dataset, spec, key, entry, cand, start, q=q, eta=eta, seed=seed)


def synthetic_candidates(
    dataset: Dataset, generator: str, q: float | None, eta: float, seed: int, probs: np.ndarray | None = None
) -> np.ndarray:
    """(N, C) bool sets of ``generator`` for the training part (its true labels). ``instance_dependent``
    follows ``probs`` (N, C) (a VLM's) or, when None, the cross-fitted helper model's."""
    y, c = dataset.train_y, dataset.num_classes
    if generator == "flip":  # q and eta enter the seed so that each grid cell draws independent sets
        return flip_candidates(y, c, q, eta, np.random.default_rng([seed, round(q * 1e6), round(eta * 1e6)]))
    rng = np.random.default_rng([seed, round((q or 0.0) * 1e6), round(eta * 1e6), synthetic.GENERATORS.index(generator)])
    if generator == "pico_plus":
        return synthetic.pico_plus_candidates(y, c, q, eta, rng)
    if generator == "uniform":
        return synthetic.uniform_candidates(y, c, eta, rng)
    if probs is None:
        probs = synthetic.helper_confidences(dataset.train_x, y, c, seed)  # (N, C)
    return synthetic.instance_dependent_candidates(y, probs, q, eta, rng)


def _annotate_given(dataset: Dataset, spec: GivenAnnotatorSpec, key: str, entry: Path) -> Annotation:
    if dataset.train_cand is None:
        raise ValueError(f"annotator {spec.name!r} (given): dataset {dataset.name} ships no candidate sets")
    return _record(dataset, spec, key, entry, dataset.train_cand.astype(bool), time.time())  # (N, C)


def _run_clip(
    dataset: Dataset,
    spec: ClipAnnotatorSpec,
    class_names: list[str],
    probs_entry: Path,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the CLIP model (the expensive part) and cache its per-template probabilities."""
    from orchestrator.annotation.clip import annotate_clip

    start = time.time()
    probs_train, probs_test = annotate_clip(dataset, spec, class_names, progress=progress)
    probs_meta = {
        "key": probs_entry.name,
        "annotator": spec.model_dump(mode="json"),
        "dataset": dataset.identity,
        "templates": templates_for(spec.templates),
        "class_names": class_names,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - start,
        "versions": _versions(),
    }
    write_entry(probs_entry, {"probs_train": probs_train, "probs_test": probs_test}, probs_meta)
    return probs_train, probs_test


def derived_from_probs(
    dataset: Dataset, spec: ClipAnnotatorSpec | VlmAnnotatorSpec, probs_train: np.ndarray, probs_test: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Candidate sets, noisy and soft labels of per-template probabilities, and their statistics."""
    arrays = {
        "cand_train": cands.candidates(probs_train, spec.candidate_mode, spec.top_k, spec.prob_ratio),
        "noisy_label": cands.single_labels(probs_train, spec.single_template),
        "noisy_label_avg": cands.average_labels(probs_train),
        "soft_train": cands.soft_labels(probs_train),
        "soft_single_train": renormalised(probs_train[:, spec.single_template]),
    }
    stats = {
        **dataset_candidate_stats(dataset, arrays["cand_train"]),
        "num_train": float(len(dataset.train_y)),
        "num_test": float(len(dataset.test_y)),
        **zero_shot_stats(probs_train, probs_test, dataset, spec.single_template),
    }
    return arrays, stats


def _annotate_clip(
    dataset: Dataset,
    spec: ClipAnnotatorSpec,
    key: str,
    entry: Path,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> Annotation:
    templates = templates_for(spec.templates)
    if spec.single_template >= len(templates):
        raise ValueError(
            f"annotator {spec.name!r}: single_template {spec.single_template} >= number of templates ({len(templates)})"
        )
    class_names = clip_class_names(dataset, spec)
    probs_key = clip_probs_key(dataset, spec)
    probs_entry = cache_dir / "clip_probs" / probs_key

    start = time.time()
    if (entry / "meta.json").is_file() and (probs_entry / "meta.json").is_file():
        return load_cached(cache_dir, key)
    found_probs = read_entry(probs_entry)
    if found_probs is not None:
        probs_train, probs_test = found_probs[0]["probs_train"], found_probs[0]["probs_test"]
    else:
        probs_train, probs_test = _run_clip(dataset, spec, class_names, probs_entry, progress)
    arrays, stats = derived_from_probs(dataset, spec, probs_train, probs_test)
    meta = {
        "key": key,
        "kind": "clip",
        "probs_key": probs_key,
        "probs_cached": found_probs is not None,
        "annotator": spec.model_dump(mode="json"),
        "dataset": dataset.identity,
        "templates": templates,
        "class_names": class_names,
        "stats": stats,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - start,
        "versions": _versions(),
    }
    write_entry(entry, arrays, meta)
    return Annotation(
        key=key, cached=False, probs_train=probs_train, probs_test=probs_test, stats=stats, meta=meta, **arrays
    )
