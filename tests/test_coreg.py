"""Co-Reg pieces on hand-made tensors, and the behaviour of its switches on a tiny data set."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainables import coreg
from helpers import tiny_ctx, tiny_pll_data
from trainables.api import TrainData
from trainables.common.gmm import clean_set
from trainables.common.targets import co_guess
from trainables.coreg import CoRegParams, partial_set_targets

N, C = 48, 4
TRUSTED = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0) -> tuple[TrainData, torch.Tensor]:
    return tiny_pll_data(N, C, q=0.3, trusted=TRUSTED, hflip=True, seed=seed)


def _build(**overrides) -> coreg.CoReg:
    params = dataclasses.replace(
        CoRegParams(warmup_epochs=1, warmup_steps=0, contrastive_start=0, queue_size=1000, rampup_epochs=2), **overrides
    )
    return coreg.SPEC.build(params, tiny_ctx(N, C, epochs=4, batch_size=16))


def _run(algo: coreg.CoReg, epochs: int = 2) -> dict[str, float]:
    data, _ = _data()
    metrics = {}
    for epoch in range(epochs):
        metrics = algo.train_epoch(data, epoch)
    return metrics


# -- pseudo-label formulas (Eq. 5-8) ------------------------------------------------------------


def test_partial_set_target_fuses_restricted_peer_and_own_prediction_then_sharpens():
    w = torch.tensor([0.8])
    peer = torch.tensor([[0.5, 0.3, 0.2]])
    cand = torch.tensor([[1.0, 1.0, 0.0]])
    own = torch.tensor([[0.2, 0.2, 0.6]])
    # peer on S: [0.625, 0.375, 0]; fused: 0.8 * that + 0.2 * own = [0.54, 0.34, 0.12]
    # sharpened with T = 0.5: squares [0.2916, 0.1156, 0.0144] / 0.4216
    expected = torch.tensor([[0.2916, 0.1156, 0.0144]]) / 0.4216
    torch.testing.assert_close(partial_set_targets(w, peer, cand, own, T=0.5), expected)


def test_partial_set_target_of_a_certain_sample_is_the_peer_on_its_candidates():
    peer = torch.tensor([[0.1, 0.6, 0.3]])
    cand, own = torch.tensor([[1.0, 0.0, 1.0]]), torch.full((1, 3), 1 / 3)
    target = partial_set_targets(torch.tensor([1.0]), peer, cand, own, T=1.0)
    torch.testing.assert_close(target, torch.tensor([[0.25, 0.0, 0.75]]))


def test_unlabeled_set_target_averages_every_view_of_both_nets_then_sharpens():
    views = [torch.tensor([[a, 1 - a]]) for a in (0.6, 0.8, 0.2, 0.4)]
    # mean [0.5, 0.5]: sharpening keeps it uniform; labels outside S are allowed (no cand input)
    torch.testing.assert_close(co_guess(views, 0.5), torch.tensor([[0.5, 0.5]]))
    # mean of the first two = [0.7, 0.3] -> [0.49, 0.09] / 0.58
    torch.testing.assert_close(co_guess(views[:2], 0.5), torch.tensor([[0.49 / 0.58, 0.09 / 0.58]]))


def test_partial_set_contains_trusted_samples_whatever_their_clean_probability():
    w = torch.tensor([0.9, 0.2, 0.6, 0.1])
    trusted = torch.tensor([False, False, False, True])
    assert clean_set(w, trusted, threshold=0.5).tolist() == [True, False, True, True]


# -- which split each net trains on -------------------------------------------------------------


def _spy_splits(algo: coreg.CoReg, monkeypatch):
    """Replace the division by hand-made clean probabilities and record what each net trains on."""
    w_by_net = {0: torch.linspace(0.0, 1.0, N), 1: torch.linspace(1.0, 0.0, N)}
    probs_by_net = {0: torch.full((N, C), 0.25), 1: 0.1 + 0.6 * torch.eye(C).repeat(N // C, 1)}
    calls = []

    def divide(i, data):
        algo.w[i] = w_by_net[i]
        return probs_by_net[i]

    def train_net(me, data, epoch, *, in_p, w, split_probs):
        calls.append((me, in_p.clone(), w.clone(), split_probs))
        return coreg.MeanMeter()

    monkeypatch.setattr(algo, "_divide", divide)
    monkeypatch.setattr(algo, "_train_net", train_net)
    data, _ = _data()
    algo.train_epoch(data, epoch=algo.params.warmup_epochs)
    return calls, w_by_net, probs_by_net, data


def _expected_p(w: torch.Tensor, probs: torch.Tensor, data: TrainData, balanced: bool) -> torch.Tensor:
    if not balanced:  # the paper's P
        return (w > 0.5) | data.trusted
    guess = (probs * data.cand).argmax(dim=1)  # the split maker's class within S
    keep = torch.zeros(N, dtype=torch.bool)
    quota = round(int((w > 0.5).sum()) / C)  # an equal quota per guessed class, highest w first
    for c in range(C):
        members = (guess == c).nonzero().flatten()
        keep[members[w[members].argsort(descending=True)[:quota]]] = True
    return keep | data.trusted


@pytest.mark.filterwarnings("ignore:Detected call of")  # the spy takes no step
@pytest.mark.parametrize("balanced", [True, False])
def test_net_a_trains_on_the_split_of_net_b_and_vice_versa(monkeypatch, balanced):
    calls, w_by_net, probs_by_net, data = _spy_splits(_build(balanced_division=balanced), monkeypatch)
    assert [me for me, *_ in calls] == [0, 1]
    for me, in_p, w, split_probs in calls:
        peer = 1 - me
        assert torch.equal(w, w_by_net[peer])
        assert torch.equal(in_p, _expected_p(w_by_net[peer], probs_by_net[peer], data, balanced))
        assert split_probs is probs_by_net[peer]
    if balanced:  # a different P than the paper's: every guessed class keeps an equal part
        assert not torch.equal(calls[1][1], _expected_p(w_by_net[0], probs_by_net[0], data, False))


@pytest.mark.filterwarnings("ignore:Detected call of")  # the spy takes no step
def test_without_co_pseudo_labelling_each_net_trains_on_its_own_split(monkeypatch):
    calls, w_by_net, probs_by_net, data = _spy_splits(_build(co_pseudo_label=False), monkeypatch)
    assert [me for me, *_ in calls] == [0, 1]
    for me, in_p, w, split_probs in calls:
        assert torch.equal(w, w_by_net[me])
        assert torch.equal(in_p, _expected_p(w_by_net[me], probs_by_net[me], data, True))
        assert split_probs is probs_by_net[me]


# -- the real loop on tiny data -------------------------------------------------------------------


def test_trusted_samples_are_clean_and_keep_their_label():
    algo = _build()
    _run(algo, epochs=2)
    _, y = _data()
    assert (algo.w[:, :TRUSTED] == 1.0).all()
    assert algo.clean_mask()[:TRUSTED].all()
    # P target of a trusted sample: w = 1 times the peer restricted to the singleton {y}: one-hot
    torch.testing.assert_close(algo.targets[:, :TRUSTED], F.one_hot(y[:TRUSTED], C).float().expand(2, -1, -1))


def test_warmup_reports_its_losses_and_has_no_split():
    algo = _build(warmup_epochs=2)
    metrics = algo.train_epoch(_data()[0], 0)
    assert {"train/loss", "train/loss_sup", "train/loss_neg"} <= set(metrics)
    assert algo.clean_mask() is None
    data, _ = _data()
    # during warm-up, pseudo-labels are predictions restricted to S
    assert (algo.pseudo_labels()[data.cand == 0] == 0).all()


def test_contrastive_and_prototype_terms_start_after_contrastive_start():
    algo = _build(contrastive_start=1)
    data, _ = _data()
    algo.train_epoch(data, 0)
    first = algo.train_epoch(data, 1)  # first epoch after warm-up: queue fills, no contrastive loss yet
    assert "train/loss_cont" not in first and int(algo.queues[0].filled) > 0
    second = algo.train_epoch(data, 2)
    assert "train/loss_cont" in second


def _fingerprint(algo: coreg.CoReg) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in algo.pair.net_a.parameters()])


@pytest.mark.parametrize("ablation", sorted(coreg.SPEC.ablations))
def test_every_ablation_changes_training(ablation):
    baseline, ablated = _build(), _build(**coreg.SPEC.ablations[ablation])
    base_metrics, ablated_metrics = _run(baseline), _run(ablated)
    assert not torch.allclose(_fingerprint(baseline), _fingerprint(ablated))
    if ablation == "no_prototypes":
        assert baseline.prototypes.abs().sum() > 0 and ablated.prototypes.abs().sum() == 0
        assert "train/loss_prot" not in ablated_metrics
    if ablation == "no_unlabeled":
        assert "train/loss_u" not in ablated_metrics and "train/loss_u" in base_metrics
    if ablation == "no_noisy_contrastive":
        assert int(ablated.queues[0].filled) == 0 and "train/loss_cont" not in ablated_metrics
    if ablation == "supcon":
        assert ablated_metrics["train/loss_cont"] != pytest.approx(base_metrics["train/loss_cont"])


@pytest.mark.parametrize("use_unlabeled", [True, False])
def test_unlabeled_split_is_trained_on_only_when_enabled(use_unlabeled):
    algo = _build(use_unlabeled=use_unlabeled)
    data, _ = _data()
    algo.train_epoch(data, 0)
    before = algo.targets.clone()
    algo.train_epoch(data, 1)
    outside_p = ~algo.in_p[1]  # net A's U (B's split)
    assert outside_p.any()
    changed = (algo.targets[0] != before[0]).any(dim=1)
    assert changed[outside_p].any() == use_unlabeled


def test_queue_longer_than_the_data_set():
    algo = _build(queue_size=4096)
    metrics = _run(algo, epochs=3)
    assert torch.isfinite(torch.tensor(metrics["train/loss_cont"]))
    assert 0 < int(algo.queues[0].filled) < 4096


def test_predict_is_the_sum_of_both_nets():
    algo = _build()
    _run(algo, epochs=2)
    x = _data()[0].views.plain(_data()[0].x[:5])
    logits_a, logits_b = algo.predict_nets(x)
    torch.testing.assert_close(algo.predict(x), logits_a + logits_b)
    assert not torch.allclose(logits_a, logits_b)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("reset", [True, False])
def test_reference_option_recopies_key_nets_at_each_epoch_start(reset, monkeypatch):
    algo = _build(reset_key_each_epoch=reset)
    _run(algo, epochs=2)  # warm-up + one epoch of momentum updates: key nets lag behind their nets

    def divide(i, data):
        same = all(torch.equal(k, q) for k, q in zip(algo.key_nets[0].parameters(), algo.pair.net_a.parameters()))
        assert same == reset
        raise _Stop

    monkeypatch.setattr(algo, "_divide", divide)
    with pytest.raises(_Stop):
        algo.train_epoch(_data()[0], 2)


def test_reference_cosine_period_and_warmup_options():
    algo = _build(cosine_period=800, reference_warmup=True)
    assert algo.pair.schedulers[0].T_max == 800 and algo.pair.schedulers[0].eta_min == pytest.approx(0.05e-3)
    assert _build().pair.schedulers[0].T_max == 4  # training.epochs
    metrics = algo.train_epoch(_data()[0], 0)  # strong views, batch 32: still a finite warm-up
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("restart", [True, False])
def test_key_nets_start_from_the_warmed_up_nets_when_the_warmup_ends(restart, monkeypatch):
    algo = _build(restart_keys_after_warmup=restart, reset_key_each_epoch=False)
    built = [copy.deepcopy(k) for k in algo.key_nets]  # the nets' random initialisation
    _run(algo, epochs=1)  # warm-up: the key nets are not used

    def divide(i, data):
        for key_net, net, init in zip(algo.key_nets, algo.pair.nets, built):
            assert _params_equal(key_net, net) == restart
            assert _params_equal(key_net, init) == (not restart)
        raise _Stop

    monkeypatch.setattr(algo, "_divide", divide)
    with pytest.raises(_Stop):
        algo.train_epoch(_data()[0], 1)


def _param_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return sum((x - y).pow(2).sum() for x, y in zip(a.parameters(), b.parameters())).sqrt().item()


def test_key_nets_follow_their_nets_and_the_contrastive_signals_are_logged():
    probe = _data()[0].views.plain(_data()[0].x[:32])
    lag = {}
    for restart in (True, False):
        algo = _build(restart_keys_after_warmup=restart, reset_key_each_epoch=False, warmup_epochs=3)
        _run(algo, epochs=4)  # 3 warm-up epochs move the nets away from their initialisation
        lag[restart] = [_param_distance(k, q) for k, q in zip(algo.key_nets, algo.pair.nets)]
    # from the warmed-up nets, the key nets stay close behind; from the build-time copy they are far
    assert all(with_restart < 0.2 * without for with_restart, without in zip(lag[True], lag[False]))
    signals = algo.diagnostics(probe)
    assert _build(warmup_epochs=3).diagnostics(probe) == {}  # the warm-up trains no projector or key net
    assert set(signals) == {"prototype_cosine"} | {
        f"{k}_{n}" for k in ("embedding_norm", "embedding_cosine", "key_query_distance", "queue_label_entropy") for n in "ab"
    }
    assert all(0.0 < signals[f"key_query_distance_{n}"] < 2.0 and 0.0 < signals[f"queue_label_entropy_{n}"] <= 1.0 for n in "ab")


def test_by_default_every_epoch_starts_with_the_key_nets_copied_from_the_nets(monkeypatch):
    algo = _build()  # reset_key_each_epoch, as the reference
    seen = []

    def divide(i, data, original=algo._divide):
        if i == 0:
            seen.append(all(_params_equal(k, q) for k, q in zip(algo.key_nets, algo.pair.nets)))
        return original(i, data)

    monkeypatch.setattr(algo, "_divide", divide)
    _run(algo, epochs=4)  # epochs 1-3 after the warm-up: the momentum updates of each epoch are undone
    assert seen == [True, True, True]
    assert not all(_params_equal(k, q) for k, q in zip(algo.key_nets, algo.pair.nets))  # they moved apart within the epoch


@pytest.mark.parametrize(
    ("warmup_steps", "fraction", "expected"),
    [(0, 2 / 3, 1), (6, 2 / 3, 2), (100, 2 / 3, 2), (100, 0.99, 3), (2, 2 / 3, 1)],
)
def test_the_warmup_is_lengthened_to_its_steps_within_the_budget(warmup_steps, fraction, expected):
    """48 samples at batch 16: 3 steps per epoch and net; 4 epochs of budget. The warm-up lasts
    ``warmup_epochs`` (1), lengthened to reach ``warmup_steps`` but never past ``fraction`` of the
    budget (nor shortened); its epochs train without a split, the next one divides."""
    algo = _build(warmup_steps=warmup_steps, max_warmup_fraction=fraction)
    assert algo.warmup_epochs == expected
    data, _ = _data()
    for epoch in range(expected):
        assert "train/loss_sup" in algo.train_epoch(data, epoch) and algo.clean_mask() is None
    algo.train_epoch(data, expected)
    assert algo.clean_mask() is not None
