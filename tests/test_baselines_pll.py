"""RC, LWS and LWC on hand-made tensors: what separates them from each other and from PRODEN / CC."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainables import lw, rc
from helpers import tiny_ctx, tiny_pll_data
from trainables.api import BuildContext, TrainData, Views

N, C = 32, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> TrainData:
    return tiny_pll_data(N, C, q=0.4)[0]


def _ctx() -> BuildContext:
    return tiny_ctx(N, C, epochs=3, batch_size=8)


def _recording(data: TrainData, state: torch.Tensor, snapshots: list[torch.Tensor]) -> TrainData:
    """``data`` whose weak view records a copy of ``state`` each time a training batch is made."""

    def weak(x: torch.Tensor) -> torch.Tensor:
        snapshots.append(state.clone())
        return data.views.weak(x)

    views = Views(plain=data.views.plain, weak=weak, strong=data.views.strong)
    return dataclasses.replace(data, views=views)


def test_rc_updates_confidences_only_at_the_end_of_an_epoch():
    data = _data()
    algo = rc.RC(rc.RCParams(), _ctx())
    snapshots: list[torch.Tensor] = []
    algo.train_epoch(_recording(data, algo.conf.table, snapshots), 0)

    initial = data.cand / data.cand.sum(dim=1, keepdim=True)
    assert len(snapshots) == N // 8
    for snapshot in snapshots:  # every batch of the epoch trains towards the initial confidences
        torch.testing.assert_close(snapshot, initial)

    probs = F.softmax(algo.predict(data.views.plain(data.x)), dim=1)
    expected = probs * data.cand / (probs * data.cand).sum(dim=1, keepdim=True)
    torch.testing.assert_close(algo.conf.table, expected)
    torch.testing.assert_close(algo.pseudo_labels(), expected)
    assert not torch.allclose(algo.conf.table, initial)


@pytest.mark.parametrize("spec", lw.SPECS, ids=lambda s: s.name)
def test_lw_weights_follow_each_batch_split_on_and_off_the_candidates(spec):
    data = _data()
    algo = spec.build(spec.params(), _ctx())
    snapshots: list[torch.Tensor] = []
    algo.train_epoch(_recording(data, algo.conf, snapshots), 0)

    initial = data.cand / data.cand.sum(dim=1, keepdim=True)
    torch.testing.assert_close(snapshots[0], initial)
    assert not torch.allclose(snapshots[-1], initial)  # updated per batch, unlike RC
    torch.testing.assert_close(algo.conf.sum(dim=1), torch.ones(N))
    assert (algo.conf[data.cand == 0] == 0).all()
    off = 1.0 - data.cand
    has_off = off.sum(dim=1) > 0
    torch.testing.assert_close(algo.conf_out[has_off].sum(dim=1), torch.ones(int(has_off.sum())))
    assert (algo.conf_out[data.cand == 1] == 0).all()


LOGITS = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
CAND = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
WEIGHTS = torch.tensor([[0.25, 1.0, 0.75], [0.5, 1.0, 0.5]])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _softplus(z: float) -> float:
    return math.log(1.0 + math.exp(z))


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_lw_loss_by_hand(beta):
    # sigmoid loss psi(z) = sigmoid(-z): candidates pay psi(f_j), non-candidates psi(-f_j) = sigmoid(f_j)
    lws_expected = [
        0.25 * _sigmoid(-1.0) + 0.75 * _sigmoid(-0.5) + beta * 1.0 * _sigmoid(-2.0),
        1.0 * _sigmoid(-3.0) + beta * (0.5 * _sigmoid(0.0) + 0.5 * _sigmoid(-1.0)),
    ]
    # logistic loss psi(z) = log(1 + e^-z)
    lwc_expected = [
        0.25 * _softplus(-1.0) + 0.75 * _softplus(-0.5) + beta * 1.0 * _softplus(-2.0),
        1.0 * _softplus(-3.0) + beta * (0.5 * _softplus(0.0) + 0.5 * _softplus(-1.0)),
    ]
    got_lws = lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=beta, psi="sigmoid")
    got_lwc = lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=beta, psi="logistic")
    torch.testing.assert_close(got_lws, torch.tensor(lws_expected))
    torch.testing.assert_close(got_lwc, torch.tensor(lwc_expected))


@pytest.mark.parametrize("psi", ["sigmoid", "logistic"])
def test_beta_zero_removes_the_non_candidate_term(psi):
    base = lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=0.0, psi=psi)
    moved = LOGITS + 5.0 * (1.0 - CAND)  # change only the non-candidate logits
    torch.testing.assert_close(lw.leveraged_weighted_loss(moved, CAND, WEIGHTS, beta=0.0, psi=psi), base)
    assert not torch.allclose(lw.leveraged_weighted_loss(moved, CAND, WEIGHTS, beta=1.0, psi=psi),
                              lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=1.0, psi=psi))


def test_lws_and_lwc_differ_on_the_same_input():
    got_lws = lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=1.0, psi="sigmoid")
    got_lwc = lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=1.0, psi="logistic")
    assert not torch.allclose(got_lws, got_lwc)

    data = _data()
    a, b = lw.LWS_SPEC.build(lw.LWParams(), _ctx()), lw.LWC_SPEC.build(lw.LWParams(), _ctx())
    assert (a.psi, b.psi) == ("sigmoid", "logistic")
    torch.testing.assert_close(a.predict(data.views.plain(data.x)), b.predict(data.views.plain(data.x)))
    loss_a, loss_b = a.train_epoch(_data(), 0)["train/loss"], b.train_epoch(_data(), 0)["train/loss"]
    assert loss_a != pytest.approx(loss_b)


def test_unknown_psi_is_refused():
    with pytest.raises(ValueError, match="sigmoid, logistic"):
        lw.leveraged_weighted_loss(LOGITS, CAND, WEIGHTS, beta=1.0, psi="hinge")
