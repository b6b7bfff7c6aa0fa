"""The annotation stage of the ``vlm`` annotator: run it (or read its cached outputs), derive the
record and its statistics.

``score`` mode stores per-template probabilities and derives everything as the CLIP stage does.
``generate`` mode stores each template's parsed answer, (N, T) int16 with -1 for an unparseable
answer, and derives:

- the candidate set: the union over templates of the parsed answers (Co-Reg section III); a sample
  whose every answer was unparseable gets all classes (no information), counted in ``no_answer_frac``;
- ``zs_acc_*``: template ``single_template``'s answer is the prediction (unparseable: wrong);
  ``zs_acc_avg_*``: the plurality of the parsed answers (a tie or no parsed answer: wrong);
- ``unparseable_rate`` (train and test, every template) and ``unparseable_rate_t<i>`` per template.

A generate-mode annotation has no probabilities, so it gives candidate sets only (the grid refuses
methods that learn from noisy or soft labels with it). The meta of its outputs entry (and so the
annotation run's ``annotation.json``) keeps the first answers of every template verbatim, the
unparseable ones first, and the driver prints each template's unparseable rate with examples.

Ground-truth labels are read only for the statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.annotation.stage import (
    RAW_SAMPLE,
    _versions,
    dataset_candidate_stats,
    clip_class_names,
    derived_from_probs,
    vlm_outputs_key,
)
from orchestrator.annotation.templates import vlm_templates_for
from trainables.common.vlm_model import UNPARSED
from orchestrator.config import VlmAnnotatorSpec
from trainables.data.annotation import Annotation, load_cached, read_entry, write_entry
from trainables.data.datasets import Dataset

OUTPUTS_DIR = "vlm_outputs"


def union_candidates(answers: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) bool union of each sample's parsed answers (N, T); all classes where none parsed."""
    cand = np.zeros((len(answers), num_classes), dtype=bool)
    rows, cols = np.nonzero(answers != UNPARSED)
    cand[rows, answers[rows, cols]] = True
    cand[~cand.any(axis=1)] = True
    return cand


def plurality(answers: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) the most frequent parsed answer, -1 on a tie or when no answer parsed."""
    votes = np.zeros((len(answers), num_classes), dtype=np.int64)
    rows, cols = np.nonzero(answers != UNPARSED)
    np.add.at(votes, (rows, answers[rows, cols]), 1)
    top = votes.max(axis=1)
    winner = votes.argmax(axis=1)
    unique = (votes == top[:, None]).sum(axis=1) == 1
    return np.where((top > 0) & unique, winner, UNPARSED)


def answer_stats(dataset: Dataset, spec: VlmAnnotatorSpec, answers_train: np.ndarray, answers_test: np.ndarray) -> dict[str, float]:
    """Zero-shot accuracies of the answers and the unparseable rates (overall and per template)."""
    out: dict[str, float] = {}
    for split, answers, labels in (("train", answers_train, dataset.train_y), ("test", answers_test, dataset.test_y)):
        empty = not len(labels)
        out[f"zs_acc_{split}"] = float("nan") if empty else float((answers[:, spec.single_template] == labels).mean())
        vote = plurality(answers, dataset.num_classes)
        out[f"zs_acc_avg_{split}"] = float("nan") if empty else float((vote == labels).mean())
    both = np.concatenate([answers_train, answers_test])
    out["unparseable_rate"] = float((both == UNPARSED).mean())
    for t in range(both.shape[1]):
        out[f"unparseable_rate_t{t}"] = float((both[:, t] == UNPARSED).mean())
    return out


def raw_sample(outputs: dict[str, Any], templates: list[str]) -> list[dict[str, Any]]:
    """Up to ``RAW_SAMPLE`` training answers per template, verbatim with their parse (unparseable first)."""
    answers, raw = outputs["answers_train"], outputs["raw_train"]
    sample = []
    for t in range(len(templates)):
        order = sorted(range(len(raw)), key=lambda i: (answers[i, t] != UNPARSED, i))[:RAW_SAMPLE]
        sample += [{"template": t, "index": i, "answer": raw[i][t], "parsed": int(answers[i, t])} for i in order]
    return sample


def report_unparseable(spec: VlmAnnotatorSpec, stats: dict[str, float], sample: list[dict[str, Any]]) -> None:
    """One line per template that had unparseable answers, with an example (they add nothing)."""
    for t in range(sum(k.startswith("unparseable_rate_t") for k in stats)):
        rate = stats[f"unparseable_rate_t{t}"]
        if rate > 0:
            example = next((s["answer"] for s in sample if s["template"] == t and s["parsed"] == UNPARSED), "")
            print(f"[vlm {spec.name}] template {t}: {100 * rate:.1f}% of answers unparseable (ignored), e.g. {example!r}", flush=True)


def _outputs(dataset: Dataset, spec: VlmAnnotatorSpec, outputs_entry: Path, progress: Callable[[int, int], None] | None) -> tuple[dict[str, Any], bool]:
    """The cached outputs, or the model run through Ray Data and cached; and whether they were cached."""
    from orchestrator.annotation import vlm

    found = read_entry(outputs_entry)
    if found is not None:
        return {**found[0], "raw_sample": found[1].get("raw_sample", [])}, True
    start = time.time()
    class_names = clip_class_names(dataset, spec)
    if spec.engine_to_run() == "vllm":
        from orchestrator.annotation import vlm_vllm

        outputs = vlm_vllm.annotate_vllm(dataset, spec, class_names, progress=progress)
    else:
        outputs = vlm.annotate_vlm(dataset, spec, class_names, progress=progress)
    templates = vlm_templates_for(spec.templates)
    arrays = {k: v for k, v in outputs.items() if not k.startswith("raw_")}
    meta = {
        "key": outputs_entry.name, "annotator": spec.model_dump(mode="json"), "engine": spec.engine_to_run(), "dataset": dataset.identity,
        "templates": templates, "class_names": class_names, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - start, "versions": _versions(),
        "raw_sample": raw_sample(outputs, templates) if spec.answer_mode == "generate" else [],
    }  # fmt: skip
    write_entry(outputs_entry, arrays, meta)
    return {**arrays, "raw_sample": meta["raw_sample"]}, False


def annotate_vlm_cached(
    dataset: Dataset,
    spec: VlmAnnotatorSpec,
    key: str,
    entry: Path,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> Annotation:
    """The annotation ``key`` of ``dataset`` by a ``vlm`` annotator (see the module docstring)."""
    templates = vlm_templates_for(spec.templates)
    if spec.single_template >= len(templates):
        raise ValueError(f"annotator {spec.name!r}: single_template {spec.single_template} >= number of templates ({len(templates)})")
    outputs_key = vlm_outputs_key(dataset, spec)
    outputs_entry = cache_dir / OUTPUTS_DIR / outputs_key
    if (entry / "meta.json").is_file() and (outputs_entry / "meta.json").is_file():
        return load_cached(cache_dir, key)
    start = time.time()
    outputs, was_cached = _outputs(dataset, spec, outputs_entry, progress)
    counts = {"num_train": float(len(dataset.train_y)), "num_test": float(len(dataset.test_y))}
    if spec.answer_mode == "score":
        arrays, stats = derived_from_probs(dataset, spec, outputs["probs_train"], outputs["probs_test"])
        kept = {"probs_train": outputs["probs_train"], "probs_test": outputs["probs_test"]}
    else:
        answers_train, answers_test = outputs["answers_train"], outputs["answers_test"]
        arrays = {"cand_train": union_candidates(answers_train, dataset.num_classes)}
        no_answer = float((answers_train == UNPARSED).all(axis=1).mean())
        stats = {**dataset_candidate_stats(dataset, arrays["cand_train"]), **counts, "no_answer_frac": no_answer}
        stats.update(answer_stats(dataset, spec, answers_train, answers_test))
        kept = {"answers_train": answers_train, "answers_test": answers_test}
        if not was_cached:
            report_unparseable(spec, stats, outputs["raw_sample"])
    meta = {
        "key": key, "kind": "vlm", "probs_key": outputs_key, "probs_dir": OUTPUTS_DIR, "probs_cached": was_cached,
        "annotator": spec.model_dump(mode="json"), "dataset": dataset.identity, "templates": templates,
        "class_names": clip_class_names(dataset, spec), "stats": stats, "raw_answers": outputs["raw_sample"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": time.time() - start, "versions": _versions(),
    }  # fmt: skip
    write_entry(entry, arrays, meta)
    return Annotation(key=key, cached=False, stats=stats, meta=meta, **arrays, **kept)
