"""Clean/noisy division by a two-component Gaussian mixture on per-sample losses (DivideMix, Co-Reg).

A division scores the whole training set with one net in eval mode (:func:`division_pass`), keeps
the min-max normalised losses of the last passes and fits the GMM to their mean (:func:`divide`);
the clean set is {w > threshold} plus the trusted samples (:func:`clean_set`). Which view and which
loss score the samples is the method's choice.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import Tensor, nn

from trainables.api import TrainData
from trainables.common.targets import restrict_to_candidates

EVAL_BATCH_SIZE = 512
"""Batch size of the division pass."""


def minmax_normalise(values: Tensor) -> Tensor:
    """Rescale to [0, 1]; a constant vector maps to zeros.  # (N,)"""
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def clean_probability(
    losses: Tensor,
    *,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    seed: int = 0,
) -> Tensor:
    """Posterior of the low-mean component of a 2-component GMM fitted to ``losses`` (N,).

    The defaults are DivideMix's and Co-Reg's (``train.py: eval_train``). Fitting runs in float64
    on the CPU; the result is returned on the device and in the dtype of ``losses``.  # (N,)
    """
    x = losses.detach().double().cpu().numpy().reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 10 EM steps is the published setting, not a failure
        gmm.fit(x)
    posterior = gmm.predict_proba(x)[:, gmm.means_.argmin()]
    return torch.from_numpy(posterior).to(device=losses.device, dtype=losses.dtype)


@torch.no_grad()
def division_pass(
    net: nn.Module,
    data: TrainData,
    view: Callable[[Tensor], Tensor],
    per_batch: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``per_batch(logits, idx)`` for every training batch in sample order, concatenated.  # (N, ...)

    ``net`` runs in eval mode on ``view`` of the samples, one batch at a time, so a random view
    draws its numbers batch by batch.
    """
    net.eval()
    batches = data.batches(EVAL_BATCH_SIZE, shuffle=False)
    return torch.cat([per_batch(net(view(data.x[idx])), idx) for idx in batches])


def divide(history: Tensor, passes: int, losses: Tensor, trusted: Tensor, *, seed: int) -> Tensor:
    """Clean probability w from this pass's per-sample ``losses`` (N,), trusted samples set to 1.  # (N,)

    ``history`` (H, N) is a ring buffer of min-max normalised losses, written in place at slot
    ``passes % H`` (``passes``: divisions before this one); the GMM is fitted to the mean of the
    last min(passes + 1, H) slots.
    """
    size = history.shape[0]
    history[passes % size] = minmax_normalise(losses)
    recent = history[: min(passes + 1, size)].mean(dim=0)  # (N,)
    w = clean_probability(recent, seed=seed)
    w[trusted] = 1.0
    return w


def clean_set(w: Tensor, trusted: Tensor, threshold: float) -> Tensor:
    """{w > threshold} plus every trusted few-shot sample (DivideMix's X, Co-Reg's P).  # (N,) bool"""
    return (w > threshold) | trusted


def class_balanced_clean_set(w: Tensor, trusted: Tensor, threshold: float, labels: Tensor, num_classes: int) -> Tensor:
    """A clean set of the size of :func:`clean_set`'s, taken class by class: for each class c of
    ``labels`` (N,) (label-free guesses), an equal quota |{w > threshold}| / C of the samples with
    the highest w, as far as c has members; plus every trusted sample.  # (N,) bool

    A global threshold fills the clean set with the classes the networks already favour; an equal
    quota per class is UNICON's uniform selection (Karim et al. 2022), under the uniform class
    prior that Co-Reg's distribution alignment also assumes."""
    quota = (w > threshold).float().sum().item() / num_classes
    keep = torch.zeros_like(trusted)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        k = min(int(round(quota)), len(members))
        if k:
            keep[members[torch.topk(w[members], k).indices]] = True
    return keep | trusted


def partial_set(w: Tensor, data: TrainData, threshold: float, split_probs: Tensor, *, balanced: bool) -> Tensor:
    """Co-Reg's P (DivideMix's X) from clean probabilities ``w`` (N,): :func:`clean_set`, or with
    ``balanced`` :func:`class_balanced_clean_set` by the classes the split-making net guesses
    (argmax of its predictions ``split_probs`` (N, C) restricted to S; no label).  # (N,) bool"""
    if not balanced:
        return clean_set(w, data.trusted, threshold)
    guess = restrict_to_candidates(split_probs, data.cand).argmax(dim=1)  # (N,)
    return class_balanced_clean_set(w, data.trusted, threshold, guess, data.cand.shape[1])
