"""ALIM-Scale: adjusting label importance on top of PiCO, with scaled soft pseudo-label targets.

Paper: M. Xu, Z. Lian, L. Feng, B. Liu, J. Tao, "ALIM: Adjusting Label Importance Mechanism for
Noisy Partial Label Learning", NeurIPS 2023 (poster: ``alim-poster.txt``, Eq. 1-2 and 6).
Reference code: github.com/zeroQiaoba/ALIM (``train_merge.py``, ``pll_model.py``,
``utils/utils_loss.py: partial_loss.confidence_update``, ``example.sh``).

PiCO (``pico.py``) where the candidate set is softened to S~ = S + lambda (1 - S): the pseudo
class that moves the prototypes and labels the SupCon queue is argmax(S~ * p) of the classifier,
and the pseudo-label moves towards w = Scale(S~ * P), Scale(z)_i = z_i^(1/K) / sum_j z_j^(1/K),
P the prototype similarity softmax(q . o / 0.07) (reference ``proto_type=cluster``,
``proto_case=Case3``): conf <- phi conf + (1 - phi) w. K is the weight of the entropy term of the
poster's objective (K = 0 gives Onehot). lambda = 0 until ``lambda_start`` (e0); then, at the end
of each epoch, lambda is either ``lam`` (``lambda_mode="fixed"``) or the eta-quantile over the
training set of the ratios max_{j in S} P_j / max_{j not in S} P_j seen during the epoch, capped at
1 (``lambda_mode="adaptive"``, reference ``piror_auto=case1`` with ``--max1``). Loss:
CE(p, conf) + 0.5 SupCon + ``mixup_weight`` CE(p(mixed x), mixed conf).

Implementation details / deviations:
1. ``scale_k`` = 1: the reference's Case3 renormalises S~ * P without a power (K = 1); K acts like
   a temperature on P (P^(1/K) = softmax(q . o / (0.07 K))) except for the lambda^(1/K) factor.
   With lambda = 0 and K = 1 the target is P restricted to S (RC / PRODEN, as the poster notes).
2. eta is estimated, not given: the reference uses the true noise rate (``--noise_rate``) unless
   ``--noise_rate_estimate`` is set. Here eta_hat is the mass of the low component of a 2-GMM on
   log(ratio) over the epoch (``common/alim.estimate_noise_rate``): a label outside S gives a
   prediction outside S, i.e. a negative log-ratio. ``eta_scale`` multiplies the estimate (searched);
   ``eta_hint`` replaces it with a user-given eta. The fraction of samples whose prediction leaves S
   would not do: its quantile is always the smallest ratio >= 1, i.e. lambda = 1.
3. ``lambda_start`` = 5 for the project's short runs (reference e0 = 80 of 1000 epochs; 140 for
   CIFAR-10 q = 0.5). ``lam`` = 0.5 for the fixed mode is the middle of the range, not a paper value.
4. No warm-up (``warmup_epochs`` = 0), as the reference (``--proto_start 1`` on 1-based epochs):
   disambiguation and SupCon run from the first epoch. With ``warmup_epochs`` > 0 the first epochs
   train as PiCO's warm-up (uniform conf, MoCo; MixUp stays on).
5. MixUp is on (reference ``--loss_weight_mixup 1``, the paper's heart rows; 0 gives the diamond
   rows): the query view mixed with a random permutation of its batch (the reference mixes with
   a second, independently shuffled batch), lambda ~ Beta(4, 4), max(l, 1 - l).
6. Few-shot trusted samples keep lambda = 0 (a revealed label is never left) and are left out of
   the quantile and the eta estimate.
7. The ratio uses the prototype P of each batch before its prototype update, as the reference's
   ``margin``; its epsilon (1e-9) too. The quantile is sorted(ratio)[int(N eta)].
8. As in ``pico.py``: query = weak view, key = strong view, phi 0.95 -> 0.8 linearly, empty initial
   queue, the project's optimiser and schedule (reference: SGD lr 0.01, wd 1e-3).
9. The reference reports the best test accuracy over epochs (test-set model selection); the loop
   reports the last epoch and a label-free selected epoch instead.
10. ``pseudo_labels()`` = conf; ``clean_mask()`` = samples whose ratio is >= lambda (S still wins,
    the poster's clean/noisy boundary) plus trusted ones, None before lambda is first set.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.api import AlgorithmSpec, BuildContext
from trainables.common.alim import ALIM, ALIMParams

NORMALISE = "scale"


@dataclass(frozen=True)
class ALIMScaleParams(ALIMParams):
    """ALIM's shared settings (``common/alim.ALIMParams``) and the power of the Scale normalisation."""

    scale_k: float = 1.0
    """K of Scale(z) = z^(1/K) / sum z^(1/K) (reference Case3: 1)."""


def build(params: ALIMScaleParams, ctx: BuildContext) -> ALIM:
    return ALIM(params, ctx, normalise=NORMALISE, k=params.scale_k)


SPEC = AlgorithmSpec(
    name="alim_scale",
    params=ALIMScaleParams,
    build=build,
    consumes="cand",
    ablations={"no_mixup": {"mixup_weight": 0.0}, "pico_targets": {"lambda_mode": "fixed", "lam": 0.0}},
    description="ALIM-Scale (Xu et al. 2023): PiCO with S~ = S + lambda (1 - S), scaled soft targets, adaptive lambda.",
)
