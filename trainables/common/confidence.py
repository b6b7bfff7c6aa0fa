"""Per-sample confidence (label distribution) updates over a candidate set, beyond PRODEN's.

PRODEN's update (prediction restricted to S, renormalised) is ``targets.restrict_to_candidates``;
PiCO's moving average is ``pico.disambiguate``. The functions here combine several augmented
views of each sample (CR-DPLL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def geometric_mean_on_candidates(probs: Tensor, cand: Tensor) -> Tensor:
    """prod_v p_v^(1/V) restricted to S and renormalised (CR-DPLL, Wu et al. 2022).  # (B, C)

    ``probs`` (V, B, C) are the softmax predictions of V views of the same samples. Computed in
    log space (mean of the log-probabilities), so tiny probabilities do not underflow the product.
    """
    log_mean = torch.log(probs.clamp_min(1e-30)).mean(dim=0)  # (B, C)
    log_mean = log_mean.masked_fill(cand <= 0, float("-inf"))
    conf = F.softmax(log_mean, dim=1)
    return torch.nan_to_num(conf, nan=0.0)  # an empty S (hand-made inputs only) gives a zero row, not NaN

