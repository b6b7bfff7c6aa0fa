"""Clean/noisy division by a two-component Gaussian mixture on per-sample losses (DivideMix, Co-Reg)."""

from __future__ import annotations

import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import Tensor


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
