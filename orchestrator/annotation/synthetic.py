"""Synthetic noisy candidate sets: the "flip" generator of ALIM (also used by Co-Reg's Table III).

Reference: github zeroQiaoba/ALIM ``utils/utils_algo.py`` and github Portugas0807/Co-Reg
``utils/utils_experi.py`` (``generate_uniform_cv_candidate_labels`` then ``generate_noise_labels``).

1. The true label is in S; every other label joins S independently with probability ``q``,
   so E|S| = 1 + q (C - 1).
2. With probability ``eta`` the sample is flipped: one label outside S, chosen uniformly, is added
   and the true label removed, so |S| is unchanged and the true label is outside S. If S already
   holds every class there is nothing to swap in and the sample stays clean (as in the reference),
   so the realised noise rate is eta * (1 - q^(C-1)), i.e. eta up to a negligible term.

Implementation details / deviations:

1. Vectorised over samples with one ``numpy.random.Generator`` (the references loop in Python over
   the global ``random`` / ``np.random`` states, unseeded). Same distribution, not the same draws.

This is not PiCO+'s generator (diagonal 1 - eta, off-diagonal q, rows redrawn until non-empty),
whose realised noise rate is below eta; that one would get its own name.
"""

from __future__ import annotations

import numpy as np


def flip_candidates(
    labels: np.ndarray,
    num_classes: int,
    q: float,
    eta: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Noisy candidate sets (N, C) bool for true ``labels`` (N,) under the flip generator.

    Ground truth enters only to generate the sets; nothing else about it is returned.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes - 1}]")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q = {q} is outside [0, 1]")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta = {eta} is outside [0, 1]")

    n = len(labels)
    rows = np.arange(n)
    cand = rng.random((n, num_classes)) < q  # (N, C)
    cand[rows, labels] = True

    flipped = np.flatnonzero(rng.random(n) < eta)
    outside = ~cand[flipped]  # (F, C) labels that can be swapped in
    n_outside = outside.sum(axis=1)
    # Uniform choice among the outside labels: the k-th one (0-based) is the first column where
    # the running count of outside labels exceeds k.
    k = np.minimum(np.floor(rng.random(len(flipped)) * n_outside), np.maximum(n_outside - 1, 0))
    new_label = np.argmax(np.cumsum(outside, axis=1) > k[:, None], axis=1)
    swap = n_outside > 0  # a full set has nothing outside it: leave it clean
    flipped, new_label = flipped[swap], new_label[swap]
    cand[flipped, new_label] = True
    cand[flipped, labels[flipped]] = False
    return cand
