"""Per-sample confidences (label distributions) over a candidate set: the table and its updates.

:class:`CandidateConfidence` is the (N, C) table that RC, PRODEN, CR-DPLL, PiCO, PiCO+, ALIM and
IRNet keep, uniform on S from the first epoch. PRODEN's update (prediction restricted to S,
renormalised) is ``targets.restrict_to_candidates``; PiCO's moving average is ``pico.disambiguate``.
The functions here combine several augmented views of each sample (CR-DPLL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class ConfidenceTableMethod:
    """The Algorithm protocol's five bookkeeping methods of a method that is one network
    (``self.model``: ``predict``, ``state_dict``) plus a confidence table over S (``self.conf``)
    and trusts every candidate set (PRODEN, RC, CR-DPLL, PiCO): predictions of the network, the
    table as pseudo-labels, no clean split, both in the checkpoint. No training logic: each method
    lists it as a base and writes its own ``train_epoch``."""

    model: Any
    conf: "CandidateConfidence"

    def predict(self, x: Tensor) -> Tensor:
        return self.model.predict(x)

    def pseudo_labels(self) -> Tensor:
        return self.conf.table.clone()

    def clean_mask(self) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**self.model.state_dict(), **self.conf.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self.conf.load_state_dict(state)


class CandidateConfidence:
    """The (N, C) confidence table, uniform over all classes until :meth:`start` makes it uniform on S.

    The candidate sets come with the data, not at build time, so the first epoch calls
    :meth:`start`. Rows are read and written by sample index (``conf[idx]``, ``conf[idx] = rows``);
    the checkpoint keys are ``conf`` and ``initialised``. The table is only ever updated in place.
    """

    def __init__(self, num_samples: int, num_classes: int, device: torch.device):
        self.table = torch.full((num_samples, num_classes), 1.0 / num_classes, device=device)  # (N, C)
        self.initialised = False

    def start(self, cand: Tensor) -> bool:
        """Set every row uniform on its candidate set S, the first time only; True when it did."""
        if self.initialised:
            return False
        self.table.copy_(cand / cand.sum(dim=1, keepdim=True))
        self.initialised = True
        return True

    def __getitem__(self, idx: Tensor | int) -> Tensor:
        return self.table[idx]

    def __setitem__(self, idx: Tensor | int, rows: Tensor) -> None:
        self.table[idx] = rows

    def state_dict(self) -> dict[str, Any]:
        return {"conf": self.table.clone(), "initialised": self.initialised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.copy_(state["conf"])
        self.initialised = bool(state["initialised"])


def geometric_mean_on_candidates(probs: Tensor, cand: Tensor) -> Tensor:
    """prod_v p_v^(1/V) restricted to S and renormalised (CR-DPLL, Wu et al. 2022).  # (B, C)

    ``probs`` (V, B, C) are the softmax predictions of V views of the same samples. Computed in
    log space (mean of the log-probabilities), so tiny probabilities do not underflow the product.
    """
    log_mean = torch.log(probs.clamp_min(1e-30)).mean(dim=0)  # (B, C)
    log_mean = log_mean.masked_fill(cand <= 0, float("-inf"))
    conf = F.softmax(log_mean, dim=1)
    return torch.nan_to_num(conf, nan=0.0)  # an empty S (hand-made inputs only) gives a zero row, not NaN

