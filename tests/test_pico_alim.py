"""PiCO, PiCO+ and ALIM pieces on hand-made tensors, and what each method does with them in training."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from trainables import alim, pico, pico_plus
from trainables.alim import adaptive_lambda, alim_target, candidate_ratio, estimate_noise_rate, relaxed_candidates
from helpers import tiny_ctx, tiny_pll_data
from trainables.api import TrainData
from trainables.common.losses import noisy_supcon_loss
from trainables.common.pico import (
    candidate_argmax, disambiguate, masked_supcon_loss, moco_loss, moving_average, own_key_mask, phi_at,
    same_label_mask,
)  # fmt: skip
from trainables.common.targets import restrict_to_candidates, sharpen
from trainables.pico_plus import knn_positives, prototype_distance, select_reliable

N, C = 48, 4
TRUSTED = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0) -> TrainData:
    return tiny_pll_data(N, C, q=0.3, trusted=TRUSTED, hflip=False, seed=seed)[0]


def _build(spec, seed: int = 0, **overrides):
    params = spec.params(**{"queue_size": 64, **overrides})
    return spec.build(params, tiny_ctx(N, C, epochs=4, batch_size=16, seed=seed))


# -- PiCO: prototype-based disambiguation ------------------------------------------------------


def test_disambiguation_moves_by_one_minus_phi_towards_the_prototype_nearest_candidate():
    conf = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.0, 0.5]])
    cand = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    # the most similar prototype overall is class 2, a non-candidate of both rows
    scores = torch.tensor([[0.1, 0.3, 0.6, 0.0], [0.25, 0.05, 0.6, 0.1]])
    updated = disambiguate(conf, scores, cand, phi=0.9)
    expected = torch.tensor([[0.45, 0.55, 0.0, 0.0], [0.28, 0.27, 0.0, 0.45]])  # 0.9 conf + 0.1 e_{1}, e_{0}
    torch.testing.assert_close(updated, expected)
    torch.testing.assert_close(updated - 0.9 * conf, 0.1 * F.one_hot(torch.tensor([1, 0]), C).float())
    assert (updated[:, 2] == 0).all()


def test_phi_ramps_linearly_from_start_to_end_over_training():
    assert phi_at(0, 10, 0.95, 0.8) == pytest.approx(0.95)
    assert phi_at(5, 10, 0.95, 0.8) == pytest.approx(0.875)
    assert phi_at(10, 10, 0.95, 0.8) == pytest.approx(0.8)


def test_pico_pseudo_labels_never_leave_the_candidate_set():
    data = _data()
    algo = _build(pico.SPEC, warmup_epochs=0)
    for epoch in range(2):
        algo.train_epoch(data, epoch)
    conf = algo.pseudo_labels()
    assert (conf[data.cand == 0] == 0).all()
    torch.testing.assert_close(conf.sum(dim=1), torch.ones(N))
    assert not torch.allclose(conf, data.cand / data.cand.sum(dim=1, keepdim=True))  # it did move
    torch.testing.assert_close(conf[:TRUSTED], data.cand[:TRUSTED])  # singletons stay one-hot


# -- contrastive losses ----------------------------------------------------------------------------


def test_masked_supcon_with_pseudo_label_positives_is_plain_supcon():
    g = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (5, 5, 7))
    labels, queue_labels = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([0, 0, 1, 2, 2, 1, 0])
    positive = same_label_mask(labels, torch.cat([labels, labels, queue_labels]))
    ours = masked_supcon_loss(q, torch.cat([q, k, queue]), positive, 0.07).mean()
    ones = torch.ones(5, dtype=torch.bool)
    queue_ones = torch.ones(7, dtype=torch.bool)
    reference = noisy_supcon_loss(q, k, queue, labels, ones, queue_labels, queue_ones, mode="supcon")
    torch.testing.assert_close(ours, reference)


def test_moco_loss_contrasts_the_own_key_against_the_queue_only():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    logits = torch.tensor([0.6, 0.0, -1.0]) / 0.5
    expected = torch.logsumexp(logits, dim=0) - logits[0]
    torch.testing.assert_close(moco_loss(q, k, queue, 0.5), expected[None])


# -- PiCO+: reliable set, kNN positives, label guess ------------------------------------------


def test_pico_plus_selects_the_samples_nearest_their_predicted_prototype():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2], [1.0, 1.0], [0.2, -1.0]]), dim=1)
    predicted = torch.tensor([0, 1, 0, 1, 1])  # rows 2 and 4 point away from their prototype
    distance = prototype_distance(q, prototypes, predicted)
    reliable = select_reliable(distance, pure_ratio=0.6)
    assert reliable.tolist() == [True, True, False, True, False]


def test_pico_plus_knn_positives_are_the_nearest_contrast_entries():
    contrast = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, -0.3], [-1.0, 0.0]]), dim=1)
    q = contrast[:1]
    assert knn_positives(q, contrast, k=3).tolist() == [[True, True, False, True, False]]  # itself + 2 nearest


def test_pico_plus_label_guess_is_the_sharpened_prototype_similarity():
    algo = _build(pico_plus.SPEC)
    algo.model.prototypes = F.normalize(torch.randn(C, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    q = F.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    score_prot = F.softmax(q @ algo.model.prototypes.T, dim=1)  # the reference's score_prot (no temperature)
    torch.testing.assert_close(algo.model.prototype_scores(q, 0.07), sharpen(score_prot, 0.07))


def test_pico_plus_trains_on_the_reliable_set_chosen_from_last_epochs_distances():
    data = _data()
    algo = _build(pico_plus.SPEC, warmup_epochs=1, knn_start=1, pure_ratio=0.5)
    algo.train_epoch(data, 0)
    assert algo.clean_mask() is None
    expected = select_reliable(algo.distance.clone(), 0.5) | data.trusted
    metrics = algo.train_epoch(data, 1)
    assert torch.equal(algo.clean_mask(), expected)
    assert 0.5 <= expected.float().mean() < 0.6 and metrics["train/labeled_fraction"] > 0
    labels = algo.pseudo_labels()
    torch.testing.assert_close(labels[~expected], algo.guess[~expected])
    assert (labels[expected][data.cand[expected] == 0] == 0).all()  # reliable targets stay on S


# -- ALIM -----------------------------------------------------------------------------------------


def test_alim_lambda_is_the_eta_quantile_of_the_ratios_capped_at_one():
    p_in_s = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.45, 0.5, 0.6, 0.8, 0.9, 0.95])
    probs = torch.stack([p_in_s, 1.0 - p_in_s], dim=1)  # two classes, S = {0}
    cand = torch.tensor([[1.0, 0.0]]).expand(10, 2)
    ratio = candidate_ratio(probs, cand)
    torch.testing.assert_close(ratio, p_in_s / (1e-9 + 1.0 - p_in_s))
    # sorted ratios: index int(10 * eta)
    assert adaptive_lambda(ratio, 0.2) == pytest.approx(0.2 / 0.8)
    assert adaptive_lambda(ratio, 0.3) == pytest.approx(0.4 / 0.6)
    assert adaptive_lambda(ratio, 0.6, cap=False) == pytest.approx(0.6 / 0.4)
    assert adaptive_lambda(ratio, 0.6) == 1.0
    # with that lambda, exactly the eta fraction of targets leaves S
    lam = adaptive_lambda(ratio, 0.3)
    assert (alim_target(probs, cand, lam, "onehot").argmax(dim=1) == 1).sum() == 3


def test_alim_onehot_and_scale_targets_on_a_crafted_prediction():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    cand = torch.tensor([[0.0, 1.0, 1.0]])
    torch.testing.assert_close(relaxed_candidates(cand, 0.5), torch.tensor([[0.5, 1.0, 1.0]]))
    # S~ * P = [0.25, 0.3, 0.2]
    torch.testing.assert_close(alim_target(probs, cand, 0.5, "onehot"), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(alim_target(probs, cand, 0.5, "scale"), torch.tensor([[0.25, 0.3, 0.2]]) / 0.75)
    squared = torch.tensor([[0.0625, 0.09, 0.04]])
    torch.testing.assert_close(alim_target(probs, cand, 0.5, "scale", k=0.5), squared / squared.sum())
    # lambda = 1 ignores S: the target follows P outside the candidates
    torch.testing.assert_close(alim_target(probs, cand, 1.0, "onehot"), torch.tensor([[1.0, 0.0, 0.0]]))


def test_alim_with_lambda_zero_is_pico_and_scale_with_k_one_is_proden():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(6, 5, generator=g), dim=1)
    cand = (torch.rand(6, 5, generator=g) < 0.5).float()
    cand[:, 0] = 1.0
    conf = restrict_to_candidates(torch.rand(6, 5, generator=g), cand)
    onehot = alim_target(probs, cand, 0.0, "onehot")
    torch.testing.assert_close(onehot, F.one_hot(candidate_argmax(probs, cand), 5).float())
    torch.testing.assert_close(moving_average(conf, onehot, 0.9), disambiguate(conf, probs, cand, 0.9))
    torch.testing.assert_close(alim_target(probs, cand, 0.0, "scale"), restrict_to_candidates(probs, cand))


def test_alim_noise_rate_estimate_finds_the_low_ratio_share():
    g = torch.Generator().manual_seed(0)
    log_ratio = torch.cat([-3.0 + 0.5 * torch.randn(60, generator=g), 4.0 + 0.5 * torch.randn(140, generator=g)])
    assert estimate_noise_rate(log_ratio.exp()) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("spec", alim.SPECS, ids=lambda s: s.name)
def test_alim_sets_lambda_from_lambda_start_and_keeps_revealed_labels(spec):
    data = _data()
    fixed = _build(spec, lambda_mode="fixed", lam=0.7, lambda_start=2)
    fixed.train_epoch(data, 0)
    assert fixed.lam == 0.0 and fixed.clean_mask() is None
    fixed.train_epoch(data, 1)
    assert fixed.lam == 0.7
    assert torch.equal(fixed.clean_mask(), (fixed.ratio >= 0.7) | data.trusted)

    hinted = _build(spec, eta_hint=0.25, lambda_start=1)
    metrics = hinted.train_epoch(data, 0)
    assert hinted.lam == adaptive_lambda(hinted.ratio[~data.trusted], 0.25)
    assert math.isfinite(metrics["train/eta_hat"]) and metrics["train/lambda"] == 0.0
    hinted.train_epoch(data, 1)
    conf = hinted.pseudo_labels()
    torch.testing.assert_close(conf[:TRUSTED], data.cand[:TRUSTED])  # lambda = 0 for revealed labels


def test_alim_resumes_exactly_with_an_adaptive_lambda():
    data = _data()
    algo = _build(alim.SCALE_SPEC, lambda_start=1, warmup_epochs=1)
    for epoch in range(2):
        algo.train_epoch(data, epoch)
    assert algo.lam > 0
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = _build(alim.SCALE_SPEC, seed=5, lambda_start=1, warmup_epochs=1)
    restored.load_state_dict(torch.load(buffer))
    assert algo.train_epoch(_data(seed=3), 2) == restored.train_epoch(_data(seed=3), 2)
    assert torch.equal(algo.pseudo_labels(), restored.pseudo_labels())
    assert algo.lam == restored.lam


def test_own_key_mask_marks_column_b_plus_i():
    mask = own_key_mask(2, 6, torch.device("cpu"))
    assert mask.nonzero().tolist() == [[0, 2], [1, 3]]


# -- the warm-up -> SupCon switch --------------------------------------------------------------


def _state_at_first_forward_of(algo, data: TrainData, epoch: int) -> dict[str, object]:
    """Key net == query net, queue fill and prototype norm as the first batch of ``epoch`` sees them."""
    model, seen = algo.model, {}
    forward = model.forward

    def spy(x_q, x_k):
        if not seen:
            same = all(torch.equal(k, q) for k, q in zip(model.key_net.parameters(), model.net.parameters()))
            seen.update(key_is_query=same, queued=int(model.queue.filled), prototypes=model.prototypes.norm().item())
        return forward(x_q, x_k)

    model.forward = spy
    algo.train_epoch(data, epoch)
    model.forward = forward
    return seen


@pytest.mark.parametrize("spec", [pico.SPEC, pico_plus.SPEC, alim.ONEHOT_SPEC], ids=lambda s: s.name)
@pytest.mark.parametrize("restart", [True, False])
def test_the_switch_restarts_key_net_queue_and_prototypes_from_the_query_net(spec, restart):
    data = _data()
    algo = _build(spec, warmup_epochs=1, restart_at_switch=restart, queue_size=1000)
    after_warmup = _state_at_first_forward_of(algo, data, 0)
    assert after_warmup == {"key_is_query": True, "queued": 0, "prototypes": 0.0}  # the build-time copy
    at_switch = _state_at_first_forward_of(algo, data, 1)
    if restart:
        assert at_switch == {"key_is_query": True, "queued": 0, "prototypes": 0.0}
    else:  # the reference: the warm-up's key net, its N queued keys and prototypes carry over
        assert at_switch["key_is_query"] is False and at_switch["queued"] == N and at_switch["prototypes"] > 0
    later = _state_at_first_forward_of(algo, data, 2)  # only once: the next epoch carries on
    assert later["key_is_query"] is False and later["queued"] == (N if restart else 2 * N)


def test_no_restart_without_a_warmup():
    data = _data()
    algo = _build(pico.SPEC, warmup_epochs=0, queue_size=1000)
    algo.train_epoch(data, 0)
    assert _state_at_first_forward_of(algo, data, 1)["queued"] == N  # epoch 0's keys are kept
