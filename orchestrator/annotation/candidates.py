"""Candidate sets and labels derived from per-template zero-shot probabilities.

Everything here is a pure function of ``probs`` (N, T, C): the probability of each class under
each prompt template (Co-Reg section III). Storing ``probs`` once lets every mode, statistic and
baseline be derived later without re-running the annotator.

Modes (reference: github Portugas0807/Co-Reg, ``utils/utils_experi.py``,
``generate_clip_annotated_candidate_labels``):

- ``multi_prompt`` (the paper's): union over templates of each template's argmax.
- ``top_k``: the k most probable classes of the template-averaged probabilities.
- ``prob_ratio``: classes whose averaged probability is >= ``prob_ratio`` times the largest one.

Implementation details / deviations:

1. ``prob_ratio``: the reference (``prob_ratio_thres``) first restricts to the top ``maxk`` classes
   and applies the ratio inside them; here the ratio alone decides (use ``top_k`` for a size cap).
   The paper's results use ``multi_prompt``, so published numbers do not depend on this.
2. Probabilities are stored in float16; averages are taken in float32. An argmax tie (possible
   after fp16 rounding) resolves to the lowest class id.

:func:`prefilter` is PartialCLIP's zero-shot pre-filter (Foundation models for PLL, "optionally
pre-filter candidate labels using zero-shot CLIP": keep the top half of the classes by zero-shot
confidence): candidates outside the top ceil(fraction * C) classes of a zero-shot score are
dropped; a set the filter would empty keeps its best-scored candidate.
"""

from __future__ import annotations

import numpy as np

MODES = ("multi_prompt", "top_k", "prob_ratio")


def _check(probs: np.ndarray) -> None:
    if probs.ndim != 3:
        raise ValueError(f"probs must be (N, T, C) per-template probabilities, got shape {probs.shape}")


def average_probs(probs: np.ndarray) -> np.ndarray:
    """Template-averaged probabilities (N, C) float32."""
    _check(probs)
    return probs.astype(np.float32).mean(axis=1)


def candidates(probs: np.ndarray, mode: str = "multi_prompt", top_k: int = 2, prob_ratio: float = 0.5) -> np.ndarray:
    """Candidate sets (N, C) bool; never empty."""
    _check(probs)
    n, _, num_classes = probs.shape
    cand = np.zeros((n, num_classes), dtype=bool)
    rows = np.arange(n)[:, None]
    if mode == "multi_prompt":
        cand[rows, probs.argmax(axis=2)] = True  # argmax per template: (N, T)
    elif mode == "top_k":
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k = {top_k} must be in [1, {num_classes}] (the number of classes)")
        avg = average_probs(probs)
        cand[rows, np.argpartition(-avg, top_k - 1, axis=1)[:, :top_k]] = True
    elif mode == "prob_ratio":
        if not 0.0 < prob_ratio <= 1.0:
            raise ValueError(f"prob_ratio = {prob_ratio} must be in (0, 1]")
        avg = average_probs(probs)
        cand = avg >= prob_ratio * avg.max(axis=1, keepdims=True)
    else:
        raise ValueError(f"unknown candidate mode {mode!r}; allowed: {', '.join(MODES)}")
    return cand


def single_labels(probs: np.ndarray, template_index: int = 0) -> np.ndarray:
    """One noisy label per sample (N,) int64: the argmax of one template (the paper's DivideMix/KD rows)."""
    _check(probs)
    if not 0 <= template_index < probs.shape[1]:
        raise ValueError(f"template_index = {template_index} is outside [0, {probs.shape[1] - 1}]")
    return probs[:, template_index].argmax(axis=1).astype(np.int64)


def average_labels(probs: np.ndarray) -> np.ndarray:
    """One noisy label per sample (N,) int64: the argmax of the template average (the starred rows)."""
    return average_probs(probs).argmax(axis=1).astype(np.int64)


def soft_labels(probs: np.ndarray) -> np.ndarray:
    """Template-averaged probabilities (N, C) float32, renormalised to sum to 1 after fp16 storage
    (distillation targets, the reference's ``kd`` mode)."""
    avg = average_probs(probs)
    return avg / avg.sum(axis=1, keepdims=True)


def prefilter(cand: np.ndarray, scores: np.ndarray, fraction: float) -> np.ndarray:
    """(N, C) bool: ``cand`` restricted to the top ceil(``fraction`` * C) classes of ``scores`` (N, C)
    per sample; where that leaves nothing, the candidate with the highest score."""
    if cand.shape != scores.shape:
        raise ValueError(f"cand {cand.shape} and scores {scores.shape} must have the same shape")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction = {fraction} must be in (0, 1]")
    n, num_classes = cand.shape
    keep = max(1, int(np.ceil(fraction * num_classes)))
    top = np.zeros_like(cand, dtype=bool)
    top[np.arange(n)[:, None], np.argsort(-scores, axis=1, kind="stable")[:, :keep]] = True
    out = cand & top
    empty = ~out.any(axis=1)
    best = np.where(cand, scores, -np.inf).argmax(axis=1)
    out[np.flatnonzero(empty), best[empty]] = True
    return out
