"""CR-DPLL and IRNet on hand-made tensors: what separates them from PRODEN / CC and from each other."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from trainables import cr_dpll, irnet
from helpers import tiny_ctx, tiny_pll_data
from trainables.api import BuildContext, TrainData, Views
from trainables.common.confidence import geometric_mean_on_candidates
from trainables.common.targets import restrict_to_candidates

N, C = 32, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> TrainData:
    data, y = tiny_pll_data(N, C, q=0.4)
    data.cand[torch.arange(N), (y + 1) % C] = 0.0  # every sample has a non-candidate label
    data.trusted[0] = True
    return data


def _ctx(lr: float = 0.05, batch_size: int = 8, epochs: int = 10) -> BuildContext:
    return tiny_ctx(N, C, epochs=epochs, batch_size=batch_size, lr=lr)


# ---------------------------------------------------------------- CR-DPLL

P0 = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
P1 = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
P2 = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.6, 0.2]])
S = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_confidence_is_the_normalised_geometric_mean_on_s():
    got = geometric_mean_on_candidates(torch.stack([P0, P1, P2]), S)
    a, b = (0.6 * 0.2 * 0.5) ** (1 / 3), (0.3 * 0.7 * 0.4) ** (1 / 3)
    c, d = (0.1 * 0.3 * 0.2) ** (1 / 3), (0.1 * 0.3 * 0.6) ** (1 / 3)
    expected = torch.tensor([[a / (a + b), b / (a + b), 0.0], [c / (c + d), d / (c + d), 0.0]])
    torch.testing.assert_close(got, expected)

    arithmetic = restrict_to_candidates((P0 + P1 + P2) / 3, S)
    proden = restrict_to_candidates(P0, S)  # PRODEN: one view restricted to S
    assert not torch.allclose(got, arithmetic, atol=1e-3)
    assert got[0].argmax() == 1 and proden[0].argmax() == 0


def test_non_candidate_loss_by_hand():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]]))  # p = [1/6, 2/6, 3/6], [1/4, 1/4, 2/4]
    cand = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    expected = torch.tensor([-math.log(1 - 2 / 6) - math.log(1 - 3 / 6), -math.log(1 - 1 / 4)])
    torch.testing.assert_close(cr_dpll.non_candidate_nll(logits, cand), expected)
    moved = logits.clone()
    moved[0, 0] += 3.0  # only a candidate logit moves: CC's loss would change, this one drops with p_out
    assert cr_dpll.non_candidate_nll(moved, cand)[0] < expected[0]


def test_consistency_weight_ramps_linearly_over_a_fraction_of_training():
    algo = cr_dpll.CRDPLL(cr_dpll.CRDPLLParams(lam=2.0, rampup_fraction=0.5), _ctx(epochs=10))
    assert [algo.consistency_weight(e) for e in (0, 2, 5, 9)] == pytest.approx([0.0, 0.8, 2.0, 2.0])


def test_cr_dpll_epoch_updates_conf_from_the_three_views_of_the_batch():
    """With lr 0 the network does not move: re-running the three recorded views gives the update."""
    data = _data()
    seen: list[tuple[str, torch.Tensor]] = []

    def recording(name, make):
        def view(x):
            out = make(x)
            seen.append((name, out.clone()))
            return out

        return view

    views = Views(plain=data.views.plain, weak=recording("weak", data.views.weak),
                  strong=recording("strong", data.views.strong))
    algo = cr_dpll.CRDPLL(cr_dpll.CRDPLLParams(), _ctx(lr=0.0, batch_size=N))
    before = {key: value.clone() for key, value in algo.model.net.state_dict().items()}
    algo.train_epoch(dataclasses.replace(data, views=views), 0)

    assert [name for name, _ in seen] == ["weak", "strong", "strong"]  # original + two strong views
    for key, value in algo.model.net.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(value, before[key])
    algo.model.net.train()
    with torch.no_grad():
        probs = torch.stack([F.softmax(algo.model.net(v), dim=1) for _, v in seen])
    idx = next(iter(_data().batches(N)))  # the one batch, in the order of the epoch's shuffle
    expected = geometric_mean_on_candidates(probs, data.cand[idx])
    torch.testing.assert_close(algo.conf[idx], expected)
    torch.testing.assert_close(algo.pseudo_labels()[idx], expected)
    assert not torch.allclose(algo.conf[idx], restrict_to_candidates(probs[0], data.cand[idx]))
    assert (algo.conf[data.cand == 0] == 0).all()


# ---------------------------------------------------------------- IRNet

CAND = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)
VIEW_A = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.7, 0.1]])
VIEW_B = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.3, 0.2, 0.4, 0.1], [0.1, 0.1, 0.1, 0.7]])
# sample 0: label 2 beats S by > 0.2 in both views; sample 1: view B beats S by only 0.1;
# sample 2: both views beat S, but with different labels (2 vs 3)


def test_detection_needs_every_view_to_agree_by_the_margin():
    noisy, label = irnet.detect_noisy(torch.stack([VIEW_A, VIEW_B]), CAND, margin=0.2)
    assert noisy.tolist() == [True, False, False]
    assert label[0] == 2
    noisy, _ = irnet.detect_noisy(torch.stack([VIEW_A, VIEW_B]), CAND, margin=0.05)
    assert noisy.tolist() == [True, True, False]  # a smaller margin lets sample 1 through
    noisy, _ = irnet.detect_noisy(VIEW_A[None], CAND, margin=0.2)
    assert noisy.tolist() == [True, True, True]  # a single view would accept all three
    full = torch.ones_like(CAND)
    assert not irnet.detect_noisy(torch.stack([VIEW_A, VIEW_B]), full, margin=0.0)[0].any()


def _initialised_irnet(**overrides) -> tuple[irnet.IRNet, TrainData]:
    data = _data()
    algo = irnet.IRNet(irnet.IRNetParams(warmup_epochs=5, **overrides), _ctx())
    algo.train_epoch(data, 0)  # before the warm-up ends: no correction
    assert torch.equal(algo.cand, data.cand) and not algo.corrected.any()
    return algo, data


def test_correction_adds_the_label_to_s_and_keeps_it_in_the_checkpoint():
    algo, data = _initialised_irnet()
    idx = torch.tensor([3, 5, 7])
    cand = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)
    algo.cand[idx], algo.conf[idx] = cand, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3)
    n = algo.correct(idx, torch.stack([VIEW_A, VIEW_B]), torch.zeros(3, dtype=torch.bool))

    assert n == 1 and algo.corrected[idx].tolist() == [True, False, False]
    assert algo.cand[3].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.equal(algo.cand[idx[1:]], cand[1:])  # one view failing, or disagreeing: S unchanged
    expected = torch.tensor([0.5, 0.5, 0.7, 0.0]) / 1.7  # new label enters with p_0 of the training view
    torch.testing.assert_close(algo.pseudo_labels()[3], expected)
    assert algo.clean_mask()[3].item() is False and algo.clean_mask()[5].item() is True

    state = algo.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = irnet.IRNet(irnet.IRNetParams(warmup_epochs=5), dataclasses.replace(_ctx(), seed=9))
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(state["cand"][3], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(restored.cand, algo.cand) and torch.equal(restored.pseudo_labels(), algo.pseudo_labels())


def test_trusted_samples_are_never_corrected_and_remove_least_drops_a_candidate():
    algo, _ = _initialised_irnet(remove_least=True)
    idx = torch.tensor([0, 4])
    algo.cand[idx], algo.conf[idx] = CAND[:2], torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 2)
    view0 = torch.tensor([[0.05, 0.15, 0.7, 0.1]] * 2)
    views = torch.stack([view0, VIEW_B[[0, 0]]])  # both samples pass detection
    assert algo.correct(idx, views, torch.tensor([True, False])) == 1
    assert algo.cand[0].tolist() == [1.0, 1.0, 0.0, 0.0]  # revealed few-shot label: untouched
    assert algo.cand[4].tolist() == [0.0, 1.0, 1.0, 0.0]  # 2 added, the least likely candidate 0 dropped
    torch.testing.assert_close(algo.conf[4], torch.tensor([0.0, 0.5, 0.7, 0.0]) / 1.2)


def test_correction_starts_from_a_training_side_signal():
    algo = irnet.IRNet(irnet.IRNetParams(warmup_epochs=3), _ctx())
    assert [algo.correcting(e) for e in (0, 2)] == [False, False] and algo.correcting(3) and algo.correct_from == 3

    plateau = irnet.IRNet(irnet.IRNetParams(warmup_epochs=3, start="plateau", plateau_window=2,
                                            plateau_tol=0.05), _ctx())
    plateau.losses = [2.0, 1.5, 1.0, 0.8]  # still falling fast
    assert not plateau.correcting(4)
    plateau.losses += [0.8, 0.79, 0.79, 0.78]  # windows (0.8, 0.79) -> (0.79, 0.78): a 1.3% drop
    assert plateau.correcting(8) and plateau.correct_from == 8
    plateau.losses += [0.1, 0.05]
    assert plateau.correcting(10) and plateau.correct_from == 8  # decided once

    off = irnet.IRNet(irnet.IRNetParams(warmup_epochs=0, correct=False), _ctx())
    assert not off.correcting(5)


def test_irnet_base_moves_conf_by_a_moving_average_towards_the_predicted_candidate():
    """PiCO-like base, not PRODEN: conf <- phi conf + (1 - phi) onehot(argmax_S p), phi(0) = 0.95."""
    data = _data()
    seen: list[torch.Tensor] = []

    def weak(x):
        seen.append(data.views.weak(x))
        return seen[-1]

    algo = irnet.IRNet(irnet.IRNetParams(warmup_epochs=5), _ctx(lr=0.0, batch_size=N))
    algo.train_epoch(dataclasses.replace(data, views=dataclasses.replace(data.views, weak=weak)), 0)
    algo.model.net.train()
    with torch.no_grad():
        probs = F.softmax(algo.model.net(seen[0]), dim=1)
    idx = next(iter(_data().batches(N)))
    cand = data.cand[idx]
    onehot = F.one_hot(probs.masked_fill(cand == 0, -1.0).argmax(dim=1), C).float()
    expected = 0.95 * cand / cand.sum(dim=1, keepdim=True) + 0.05 * onehot
    assert len(seen) == 1  # no extra detection views before the warm-up ends
    torch.testing.assert_close(algo.conf[idx], expected)
    assert not torch.allclose(algo.conf[idx], restrict_to_candidates(probs, cand))
