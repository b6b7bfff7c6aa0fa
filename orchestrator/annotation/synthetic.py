"""Synthetic noisy candidate sets from true labels, one named generator each (never mixed).

``flip`` (ALIM's; also Co-Reg's Table III). Reference: github zeroQiaoba/ALIM ``utils/utils_algo.py``
and github Portugas0807/Co-Reg ``utils/utils_experi.py`` (``generate_uniform_cv_candidate_labels``
then ``generate_noise_labels``).

1. The true label is in S; every other label joins S independently with probability ``q``,
   so E|S| = 1 + q (C - 1).
2. With probability ``eta`` the sample is flipped: one label outside S, chosen uniformly, is added
   and the true label removed, so |S| is unchanged and the true label is outside S. If S already
   holds every class there is nothing to swap in and the sample stays clean (as in the reference),
   so the realised noise rate is eta * (1 - q^(C-1)), i.e. eta up to a negligible term.

``pico_plus`` (PiCO+, Wang et al. 2023; github hbzju/PiCO, ``utils_plus/utils_algo.py``,
``generate_uniform_cv_candidate_labels(train_labels, partial_rate, noisy_rate)``): each label j
joins S independently with probability T[y, j], T = diag(1 - eta) + q off the diagonal; a row that
comes out empty is redrawn whole until it is not. With a = (1 - q)^(C-1), the redraw conditions on
"not empty" (probability 1 - eta a), so the realised noise rate is eta (1 - a) / (1 - eta a) <= eta
and E|S| = ((1 - eta) + q (C - 1)) / (1 - eta a).

``uniform`` (uniform set sampling, USS: Feng et al. 2020, "Provably consistent partial-label
learning", their RC/CC code's ``generate_uniform_cv_candidate_labels(dataname, train_labels)``; the
PLL benchmarks' code, PLENCH and PartialCLIP, uses the same function, named ``uss``): the set size k in 1..C-1 is drawn with
P(k) = binom(C, k) / (2^C - 2), then k - 1 wrong labels uniformly without replacement, so E|S| =
C / 2 exactly and S is never the full set. There is no q. ``eta`` adds flip's step 2 on top (0: the
plain PLL of the references); since S is never full, the realised noise rate is exactly eta.

``instance_dependent`` (VALEN, Xu et al. NeurIPS 2021, ``generate_instancedependent_candidate_labels``;
the same rule in the PLL benchmarks' code, e.g. PartialCLIP's trainer): from a helper model's
class probabilities p (N, C), r_j = p_j / max_{k != y} p_k for j != y and r_y = 0, then
P(j in S) = min(1, rate * r_j / mean_k r_k) (the mean over all C entries), the true label always in
S. ``rate`` is the grid's ``q`` (the references fix it, e.g. 0.4 in PartialCLIP's trainer); unclipped, E|S| = 1 + q C.
The helper here (:func:`helper_confidences`) is a multinomial logistic regression on the training
pool's pixels (average-pooled to at most 8x8) or features, cross-fitted on two seeded halves with
their clean labels, so no sample's probabilities come from a model that saw it (the references
load a network trained on the clean training set). ``eta`` adds flip's step 2 with the new label
drawn in proportion to the helper's probabilities of the labels outside S (an instance-dependent
flip; not in VALEN, which is plain PLL: ``eta = 0`` reproduces it).

Implementation details / deviations (all generators):

1. Vectorised over samples with one ``numpy.random.Generator`` (the references loop in Python over
   the global ``random`` / ``np.random`` states, unseeded). Same distributions, not the same draws.
"""

from __future__ import annotations

import numpy as np

GENERATORS = ("flip", "pico_plus", "uniform", "instance_dependent")
USES_Q = frozenset({"flip", "pico_plus", "instance_dependent"})
"""Generators with a ``q`` (uniform set sampling has none: its cells carry q = None)."""


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
    labels = _check(labels, num_classes, q, eta)
    n = len(labels)
    rows = np.arange(n)
    cand = rng.random((n, num_classes)) < q  # (N, C)
    cand[rows, labels] = True

    return swap_true_label(cand, labels, eta, rng)


def swap_true_label(
    cand: np.ndarray, labels: np.ndarray, eta: float, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """Flip's step 2, in place on ``cand`` (N, C): with probability ``eta`` a label outside S joins S
    and the true label leaves it. The new label is uniform among the outside labels, or drawn in
    proportion to ``weights`` (N, C) (``instance_dependent``). A full set stays clean."""
    flipped = np.flatnonzero(rng.random(len(labels)) < eta)
    outside = ~cand[flipped]  # (F, C) labels that can be swapped in
    n_outside = outside.sum(axis=1)
    u = rng.random(len(flipped))
    if weights is None:
        # Uniform choice among the outside labels: the k-th one (0-based) is the first column where
        # the running count of outside labels exceeds k.
        k = np.minimum(np.floor(u * n_outside), np.maximum(n_outside - 1, 0))
        new_label = np.argmax(np.cumsum(outside, axis=1) > k[:, None], axis=1)
    else:
        w = np.maximum(weights[flipped], 1e-12) * outside  # (F, C)
        total = np.cumsum(w, axis=1)
        new_label = np.argmax(total > (u * total[:, -1])[:, None], axis=1)
    swap = n_outside > 0  # a full set has nothing outside it: leave it clean
    flipped, new_label = flipped[swap], new_label[swap]
    cand[flipped, new_label] = True
    cand[flipped, labels[flipped]] = False
    return cand


def _check(labels: np.ndarray, num_classes: int, q: float | None, eta: float) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes - 1}]")
    if q is not None and not 0.0 <= q <= 1.0:
        raise ValueError(f"q = {q} is outside [0, 1]")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta = {eta} is outside [0, 1]")
    return labels


def pico_plus_candidates(labels: np.ndarray, num_classes: int, q: float, eta: float, rng: np.random.Generator) -> np.ndarray:
    """PiCO+'s noisy candidate sets (N, C) bool: label j in S with probability 1 - eta (j = y) or q
    (j != y), each row redrawn whole until it is not empty."""
    labels = _check(labels, num_classes, q, eta)
    if eta >= 1.0 and q <= 0.0:
        raise ValueError("pico_plus with eta = 1 and q = 0 can only draw empty sets")
    n = len(labels)
    rows = np.arange(n)
    keep = np.where(np.arange(num_classes)[None, :] == labels[:, None], 1.0 - eta, q)  # (N, C) = T[y]
    cand = rng.random((n, num_classes)) <= keep
    empty = np.flatnonzero(~cand.any(axis=1))
    while len(empty):  # the reference's "while partialY[j].sum() == 0: redraw the row"
        cand[empty] = rng.random((len(empty), num_classes)) <= keep[empty]
        empty = empty[~cand[empty].any(axis=1)]
    if eta == 0.0:
        cand[rows, labels] = True  # the reference's reset (already so: T[y, y] = 1)
    return cand


def uss_size_probs(num_classes: int) -> np.ndarray:
    """P(|S| = k) for k = 1..C-1 under uniform set sampling: binom(C, k) / (2^C - 2), computed in
    log space (C = 1000 would overflow 2^C)."""
    from math import lgamma, log

    c = num_classes
    k = np.arange(1, c)
    log_binom = np.array([lgamma(c + 1) - lgamma(i + 1) - lgamma(c - i + 1) for i in k])
    log_norm = c * log(2.0) + np.log1p(-2.0 ** (1 - c))  # log(2^C - 2)
    p = np.exp(log_binom - log_norm)
    return p / p.sum()


def uniform_candidates(labels: np.ndarray, num_classes: int, eta: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform set sampling (USS) (N, C) bool, then flip's step 2 with probability ``eta``."""
    labels = _check(labels, num_classes, None, eta)
    if num_classes < 2:
        raise ValueError("uniform set sampling needs at least 2 classes")
    n = len(labels)
    rows = np.arange(n)
    size = rng.choice(np.arange(1, num_classes), size=n, p=uss_size_probs(num_classes))  # (N,) |S|
    keys = rng.random((n, num_classes))
    keys[rows, labels] = np.inf  # the true label is never one of the k - 1 wrong ones
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)  # (N, C) rank of each label's key
    cand = rank < (size - 1)[:, None]
    cand[rows, labels] = True
    return swap_true_label(cand, labels, eta, rng)


def instance_dependent_candidates(
    labels: np.ndarray, probs: np.ndarray, q: float, eta: float, rng: np.random.Generator
) -> np.ndarray:
    """VALEN's instance-dependent sets (N, C) bool from a helper's class probabilities ``probs``
    (N, C), with ``q`` as the rate; then flip's step 2 with probability ``eta``, the new label drawn
    in proportion to ``probs`` outside S."""
    n, num_classes = probs.shape
    labels = _check(labels, num_classes, q, eta)
    if len(labels) != n:
        raise ValueError(f"{n} rows of probabilities for {len(labels)} labels")
    return swap_true_label(_valen_sets(labels, probs, q, rng), labels, eta, rng, weights=probs)


def flip_rates(labels: np.ndarray, probs: np.ndarray, q: float) -> np.ndarray:
    """(N, C) probability that each label joins S under ``instance_dependent`` (0 for the true one)."""
    rows = np.arange(len(labels))
    r = np.asarray(probs, dtype=np.float64).copy()
    r[rows, labels] = 0.0
    r /= np.maximum(r.max(axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(r.mean(axis=1, keepdims=True), 1e-12) * q
    return np.minimum(r, 1.0)


def _valen_sets(labels: np.ndarray, probs: np.ndarray, q: float, rng: np.random.Generator) -> np.ndarray:
    cand = rng.random(probs.shape) < flip_rates(labels, probs, q)
    cand[np.arange(len(labels)), labels] = True
    return cand


def helper_confidences(x: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """(N, C) class probabilities of each training sample from a logistic regression fitted on the
    clean labels of the *other* seeded half (two-fold cross-fitting). Images are average-pooled to
    at most 8x8 per channel and scaled to [0, 1]; features are standardised."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    feats = _helper_features(x)
    fold = np.random.default_rng([seed, 0x1D]).permutation(len(labels)) % 2
    probs = np.full((len(labels), num_classes), 1.0 / num_classes)
    for k in (0, 1):
        fit, out = fold != k, fold == k
        if len(np.unique(labels[fit])) < 2:
            continue  # too few samples to fit anything: uniform probabilities
        with warnings.catch_warnings():  # an unconverged fit still ranks the classes, which is all VALEN uses
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(max_iter=300, C=1.0).fit(feats[fit], labels[fit])
        probs[out] = 0.0
        probs[np.ix_(out, model.classes_)] = model.predict_proba(feats[out])
    return probs


def _helper_features(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:  # feature vectors
        x = x.astype(np.float64)
        return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    n, c, h, w = x.shape
    f = max(1, h // 8)  # (N, C, H, W) -> (N, C, H/f, W/f) block means
    pooled = x[:, :, : h // f * f, : w // f * f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))
    return pooled.reshape(n, -1) / 255.0
