"""LWS: the leveraged weighted loss with the sigmoid loss.

Paper: H. Wen, J. Cui, H. Hang, J. Liu, Y. Wang, Z. Lin, "Leveraged Weighted Loss for Partial Label
Learning", ICML 2021. Reference code: github.com/hongwei-wen/LW-loss-for-partial-label
(``utils/utils_loss.py: lws_loss``, ``utils/utils_algo.py: confidence_update_lw``).

Each sample keeps loss weights w in two parts: ``conf`` (N, C), a distribution over its candidate
set S, and ``conf_out`` (N, C), a distribution over the non-candidates. The loss on the raw logits f is
L = sum_{j in S} w_j psi(f_j) + beta sum_{j not in S} w_j psi(-f_j) with the sigmoid loss
psi(z) = sigmoid(-z); beta leverages the non-candidate term against the candidate one. After every
mini-batch the weights of that batch are re-estimated from the model's softmax p: restricted to S and
renormalised on the candidates, restricted to the complement and renormalised on the others.

Implementation details / deviations:
1. The weight update uses the softmax of the same forward pass as the loss (detached, before the
   optimiser step); the reference re-runs the model on the batch after the step.
2. Weights start uniform on S and uniform on the complement; the reference starts from 1/C on every
   class and reaches this normalisation only after a sample's first update.
3. ``beta`` defaults to 1, the reference's setting for CIFAR-10-like low-ambiguity cases (its
   parameter notes use 1 to 4 depending on the data and the flip rate q; its argparse default is 0).
   The weight of the candidate term is fixed to 1 (the reference's ``lw0`` default).
4. Training uses the weak view (shift + flip) by default; the reference trains on un-augmented
   inputs (``augment=False`` does that).
5. Optimiser and schedule are the project's shared ones (SGD + cosine per epoch, ``TrainSettings``);
   the reference uses SGD with an exponential step decay.
6. ``pseudo_labels()`` returns ``conf``, the candidate part of the weights (uniform over all classes
   until the first epoch has seen the candidate sets); ``clean_mask()`` is None because LWS does not
   separate clean from noisy samples. Both parts are saved in ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.api import AlgorithmSpec, BuildContext
from trainables.common.leveraged import LeveragedWeighted

PSI = "sigmoid"


@dataclass(frozen=True)
class LWSParams:
    beta: float = 1.0
    """Weight of the non-candidate term (the paper's beta; 0 drops it)."""
    augment: bool = True
    """Train on weak views (shift + flip); False trains on plain views as the reference does."""


def build(params: LWSParams, ctx: BuildContext) -> LeveragedWeighted:
    return LeveragedWeighted(params, ctx, psi=PSI)


SPEC = AlgorithmSpec(
    name="lws",
    params=LWSParams,
    build=build,
    consumes="cand",
    description="LWS (Wen et al. 2021): leveraged weighted sigmoid loss on candidates and non-candidates.",
)
