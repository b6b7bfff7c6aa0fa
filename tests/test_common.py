"""Unit tests of the shared pieces in trainables/common on hand-made tensors.

Expected values are worked out by hand (or by a deliberately naive re-implementation from the
definition), never copied from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.api import BuildContext, TrainData, TrainSettings, Views
from trainables.common.augment import RAND_AUGMENT_OPS, make_views, rand_augment
from trainables.common.backbones import BACKBONES, make_encoder
from trainables.common.batches import split_batches
from trainables.common.confidence import CandidateConfidence
from trainables.common.gmm import clean_probability, minmax_normalise
from trainables.common.losses import (
    kl_div, max_candidate_nll, mean_or_zero, neg_entropy, noisy_supcon_loss, partial_ce, soft_ce, squared_error,
)  # fmt: skip
from trainables.common.mixup import mixmatch, mixmatch_losses, mixup, sample_mix_lambda
from trainables.common.moco import KeyQueue, make_key_net, momentum_update
from trainables.common.nets import Net, seeded
from trainables.common.optim import make_optimizer
from trainables.common.prototypes import ema_update_prototypes
from trainables.common.schedules import linear_ramp
from trainables.common.targets import distribution_alignment, restrict_to_candidates, sharpen
from trainables.common.two_net import TwoNets, labeled_fraction, per_net_state


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# -- losses -----------------------------------------------------------------------------------


def test_partial_ce_is_minus_log_candidate_mass():
    logits = _logits([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    cand = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    expected = torch.tensor([-math.log(0.8), -math.log(0.1)])
    torch.testing.assert_close(partial_ce(logits, cand), expected)


def test_partial_ce_is_finite_for_extreme_logits():
    logits = torch.tensor([[200.0, -200.0, 0.0]])
    loss = partial_ce(logits, torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(400.0)


def test_neg_entropy():
    uniform = torch.zeros(1, 4)
    assert neg_entropy(uniform).item() == pytest.approx(-math.log(4))
    probs = [[0.5, 0.25, 0.25]]
    assert neg_entropy(_logits(probs)).item() == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.25))


def test_soft_ce_and_kl():
    logits = _logits([[0.5, 0.25, 0.25]])
    targets = torch.tensor([[0.0, 1.0, 0.0]])
    assert soft_ce(logits, targets).item() == pytest.approx(math.log(4))
    # KL(t || q) with a zero in t: 0 log 0 = 0
    targets = torch.tensor([[0.5, 0.5, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25)
    assert kl_div(torch.log_softmax(logits, dim=1), targets).item() == pytest.approx(expected)


def test_max_candidate_nll_uses_the_largest_candidate():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    cand = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(max_candidate_nll(probs, cand), torch.tensor([-math.log(0.3), -math.log(0.6)]))


def test_squared_error_is_a_mean_over_classes_and_mean_or_zero():
    probs, targets = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    assert squared_error(probs, targets).item() == pytest.approx(0.25)
    empty = torch.zeros(0, requires_grad=True)
    zero = mean_or_zero(empty)
    assert zero.item() == 0.0 and zero.requires_grad


# -- targets ------------------------------------------------------------------------------------


def test_restrict_to_candidates():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    out = restrict_to_candidates(probs, torch.tensor([[1.0, 0.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5 / 0.7, 0.0, 0.2 / 0.7]]))


def test_sharpen():
    out = sharpen(torch.tensor([[0.6, 0.4]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))
    torch.testing.assert_close(sharpen(torch.tensor([[0.6, 0.4]]), 1.0), torch.tensor([[0.6, 0.4]]))


def test_distribution_alignment_divides_by_the_mean_prediction():
    probs = torch.tensor([[0.5, 0.5]])
    mean = torch.tensor([0.8, 0.2])
    # 0.5 / 0.8 = 0.625, 0.5 / 0.2 = 2.5 -> normalised 0.2, 0.8
    torch.testing.assert_close(distribution_alignment(probs, mean), torch.tensor([[0.2, 0.8]]))
    prior = torch.tensor([0.75, 0.25])  # 0.625 * 0.75 = 0.46875, 2.5 * 0.25 = 0.625
    torch.testing.assert_close(
        distribution_alignment(probs, mean, prior), torch.tensor([[0.46875 / 1.09375, 0.625 / 1.09375]])
    )


# -- confidence table ---------------------------------------------------------------------------


def test_candidate_confidence_starts_uniform_on_s_once():
    cand = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    conf = CandidateConfidence(3, 4, torch.device("cpu"))
    torch.testing.assert_close(conf.table, torch.full((3, 4), 0.25))  # before any data: uniform on all classes
    assert conf.start(cand) is True
    on_s = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(conf.table, on_s)
    conf[torch.tensor([1])] = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert conf.start(torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)) is False  # once only: nothing is reset
    torch.testing.assert_close(conf[1], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(conf[torch.tensor([2, 0])], on_s[[2, 0]])
    assert (conf[cand == 0] == torch.tensor([0.0, 0.0, 0.1, 0.2, 0.4])).all()


def test_candidate_confidence_state_round_trip_keeps_the_keys_and_the_table_object():
    conf = CandidateConfidence(2, 3, torch.device("cpu"))
    conf.start(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    conf[torch.tensor([0])] = torch.tensor([[0.9, 0.0, 0.1]])
    state = conf.state_dict()
    assert set(state) == {"conf", "initialised"} and state["initialised"] is True
    conf[torch.tensor([0])] = torch.tensor([[0.0, 0.0, 1.0]])  # the saved table is a copy
    torch.testing.assert_close(state["conf"], torch.tensor([[0.9, 0.0, 0.1], [0.0, 1.0, 0.0]]))

    restored = CandidateConfidence(2, 3, torch.device("cpu"))
    table = restored.table
    restored.load_state_dict(state)
    assert restored.table is table  # loaded in place: references to the table stay valid
    torch.testing.assert_close(restored.table, state["conf"])
    assert restored.initialised and restored.start(torch.ones(2, 3)) is False
    torch.testing.assert_close(restored.table, state["conf"])


# -- GMM ----------------------------------------------------------------------------------------


def test_gmm_puts_high_losses_in_the_noisy_component():
    g = torch.Generator().manual_seed(0)
    low = 0.1 + 0.03 * torch.randn(80, generator=g)
    high = 0.8 + 0.05 * torch.randn(20, generator=g)
    losses = minmax_normalise(torch.cat([low, high]))
    w = clean_probability(losses)
    assert w.shape == (100,) and w.dtype == losses.dtype
    assert (w[:80] > 0.9).all() and (w[80:] < 0.1).all()


def test_minmax_normalise():
    torch.testing.assert_close(minmax_normalise(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert (minmax_normalise(torch.full((3,), 7.0)) == 0).all()


# -- mixup and schedules --------------------------------------------------------------------------


def test_mixup_with_given_lambda_and_permutation():
    x = torch.tensor([[0.0], [10.0], [20.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    perm = torch.tensor([2, 0, 1])
    mixed_x, mixed_t = mixup(x, t, 0.75, perm)
    torch.testing.assert_close(mixed_x, torch.tensor([[5.0], [7.5], [17.5]]))
    torch.testing.assert_close(mixed_t, torch.tensor([[0.875, 0.125], [0.25, 0.75], [0.375, 0.625]]))


def test_sample_mix_lambda_is_reproducible_and_at_least_half():
    draws = [sample_mix_lambda(4.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(0.5 <= lam <= 1.0 for lam in draws)
    assert len(set(draws)) > 150
    assert sample_mix_lambda(4.0, torch.Generator().manual_seed(3)) == draws[3]
    # E[max(l, 1 - l)] for Beta(4, 4) is about 0.64 (far from 1: mixing is strong)
    assert 0.6 < sum(draws) / len(draws) < 0.68


def test_linear_ramp():
    assert linear_ramp(-1.0, 16) == 0.0
    assert linear_ramp(4.0, 16) == 0.25
    assert linear_ramp(20.0, 16) == 1.0


def test_make_optimizer_cosine_and_constant():
    w = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_optimizer([w], TrainSettings(lr=0.1, momentum=0.8, weight_decay=1e-3), epochs=4)
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["weight_decay"] == 1e-3
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 0.1 * (1 + cos(pi e / 4)) / 2
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    assert lrs[2] == pytest.approx(0.05)
    opt, sched = make_optimizer([w], TrainSettings(lr=0.1, scheduler="constant"), epochs=4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


# -- MoCo and prototypes --------------------------------------------------------------------------


def test_key_queue_wraps_around_and_reports_only_filled_slots():
    queue = KeyQueue(size=5, dim=2)
    assert queue.contents()[0].shape == (0, 2)
    keys = torch.arange(6.0).reshape(3, 2)
    queue.enqueue(keys, torch.tensor([0, 1, 2]), torch.tensor([True, False, True]))
    k, labels, conf = queue.contents()
    assert k.shape == (3, 2) and labels.tolist() == [0, 1, 2] and conf.tolist() == [True, False, True]

    queue.enqueue(torch.full((4, 2), 9.0), torch.tensor([3, 4, 5, 6]), torch.tensor([False] * 4))
    # slots 3, 4, 0, 1 are overwritten; slot 2 keeps the third key of the first batch
    k, labels, conf = queue.contents()
    assert int(queue.ptr) == 2 and int(queue.filled) == 5
    assert labels.tolist() == [5, 6, 2, 3, 4]
    assert conf.tolist() == [False, False, True, False, False]
    torch.testing.assert_close(k[2], torch.tensor([4.0, 5.0]))


def test_key_queue_keeps_the_last_rows_of_a_batch_longer_than_itself():
    queue = KeyQueue(size=3, dim=1)
    queue.enqueue(torch.arange(7.0)[:, None], torch.arange(7), torch.ones(7, dtype=torch.bool))
    assert sorted(queue.contents()[1].tolist()) == [4, 5, 6]


def test_momentum_update_moves_the_key_net_towards_the_net():
    net = torch.nn.Linear(2, 1)
    key = make_key_net(net)
    assert not any(p.requires_grad for p in key.parameters())
    with torch.no_grad():
        net.weight.fill_(1.0)
        key.weight.fill_(0.0)
    momentum_update(key, net, 0.9)
    torch.testing.assert_close(key.weight, torch.full((1, 2), 0.1))


def test_prototype_ema_equals_sequential_updates_then_normalisation():
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    labels = torch.tensor([0, 2, 0, 0, 2, 1])
    m = 0.9
    expected = protos.clone()
    for zi, c in zip(z, labels):  # the reference's per-sample loop
        expected[c] = m * expected[c] + (1 - m) * zi
    expected = torch.nn.functional.normalize(expected, dim=1)
    torch.testing.assert_close(ema_update_prototypes(protos, z, labels, m), expected)


def test_prototypes_from_zero_become_the_first_embedding():
    z = torch.tensor([[0.6, 0.8]])
    out = ema_update_prototypes(torch.zeros(2, 2), z, torch.tensor([1]), 0.999)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


# -- noisy supervised contrastive loss ------------------------------------------------------------


def _reference_contrastive(q, contrast, positives, denominators, temperature):
    """-mean_anchors mean_{p in P(i)} log( exp(s_ip) / sum_{d in D(i)} exp(s_id) ), from explicit sets."""
    total = 0.0
    for i, (pos, den) in enumerate(zip(positives, denominators)):
        s = [float(q[i] @ contrast[j]) / temperature for j in range(len(contrast))]
        log_den = math.log(sum(math.exp(s[d]) for d in den))
        total += -sum(s[p] - log_den for p in pos) / len(pos)
    return total / len(positives)


def _crafted_case():
    angles = torch.tensor([0.1, 0.7, 1.3, 2.1, 2.9, 4.0])
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    q, k, queue = emb[0:2], emb[2:4], emb[4:6]
    # contrast order: 0 q0, 1 q1, 2 k0, 3 k1, 4 queue0, 5 queue1
    labels = torch.tensor([0, 0])
    confident = torch.tensor([True, False])
    queue_labels = torch.tensor([0, 1])
    queue_confident = torch.tensor([True, True])
    return q, k, queue, labels, confident, queue_labels, queue_confident, emb


def test_noisy_contrastive_positives_and_denominator_on_a_crafted_case():
    q, k, queue, labels, confident, queue_labels, queue_confident, contrast = _crafted_case()
    # anchor 0 (label 0, confident): own key k0 and the confident same-label queue0 are positives;
    #   q1 and k1 share label 0 but are not confident -> removed; queue1 (label 1) is a negative.
    # anchor 1 (label 0, not confident): only its own key k1; every other label-0 sample is removed.
    positives = [[2, 4], [3]]
    denominators = [[2, 4, 5], [3, 5]]
    expected = _reference_contrastive(q, contrast, positives, denominators, 0.5)
    loss = noisy_supcon_loss(q, k, queue, labels, confident, queue_labels, queue_confident, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_mode_uses_every_same_label_sample():
    q, k, queue, labels, confident, queue_labels, queue_confident, contrast = _crafted_case()
    positives = [[1, 2, 3, 4], [0, 2, 3, 4]]
    denominators = [[1, 2, 3, 4, 5], [0, 2, 3, 4, 5]]
    expected = _reference_contrastive(q, contrast, positives, denominators, 0.5)
    loss = noisy_supcon_loss(
        q, k, queue, labels, confident, queue_labels, queue_confident, temperature=0.5, mode="supcon"
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_noisy_contrastive_works_with_an_empty_queue_and_rejects_unknown_modes():
    q, k, _, labels, confident, *_ = _crafted_case()
    empty = torch.zeros(0, 2)
    loss = noisy_supcon_loss(q, k, empty, labels, confident, labels[:0], confident[:0])
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="supcon"):
        noisy_supcon_loss(q, k, empty, labels, confident, labels[:0], confident[:0], mode="moco")


# -- augmentation -----------------------------------------------------------------------------


def _images(c: int = 3, size: int = 32, n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_plain_view_normalises():
    views = make_views("image", mean=(0.5,), std=(0.25,), hflip=True, generator=torch.Generator())
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    torch.testing.assert_close(views.plain(x), torch.tensor([[[[-2.0, 2.0]]]]))


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32), (3, 64)])
def test_views_are_reproducible_and_shaped(channels, size):
    x = _images(channels, size)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        views = make_views("image", mean=[0.5] * channels, std=[0.25] * channels, hflip=True, generator=generator)
        return views.weak(x), views.strong(x)

    weak, strong = run(0)
    assert weak.shape == strong.shape == x.shape and weak.dtype == strong.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip((weak, strong), run(0)))
    assert not torch.equal(strong, run(1)[1])


def test_weak_view_is_a_shift_and_never_flips_without_hflip():
    # a horizontal ramp: a shift keeps it increasing along each row (where not padded); a flip would reverse it
    x = torch.arange(32, dtype=torch.uint8).repeat(8, 1, 32, 1) * 8  # (8, 1, 32, 32)
    views = make_views("image", mean=None, std=None, hflip=False, generator=torch.Generator().manual_seed(0))
    weak = views.weak(x)
    inner = weak[..., 4:-4, 4:-4]
    assert (inner.diff(dim=-1) > 0).all()
    # pixel (16, 16) shows column 16 + shift, with |shift| <= 12.5% of 32 = 4, and not always 0
    shift = (weak[:, 0, 16, 16] * 255 / 8).round() - 16
    assert shift.abs().max() <= 4 and shift.abs().max() > 0


def test_every_rand_augment_op_keeps_shape_and_range():
    x = _images(3, 16).float() / 255
    m, s = torch.rand(len(x)), torch.where(torch.rand(len(x)) < 0.5, -1.0, 1.0)
    for name, op in RAND_AUGMENT_OPS.items():
        out = op(x, m, s)
        assert out.shape == x.shape, name
        assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5, name
    out = rand_augment(x[:, :1], torch.Generator().manual_seed(0), num_ops=2)  # 1 channel: no colour op
    assert out.shape == (len(x), 1, 16, 16)


def test_feature_views():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    views = make_views("features", mean=None, std=None, hflip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(views.plain(x), x)
    weak, strong = views.weak(x), views.strong(x)
    assert weak.shape == strong.shape == x.shape
    assert (weak - x).abs().mean() < (strong - x).abs().mean()
    again = make_views("features", mean=None, std=None, hflip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.weak(x), weak)
    with pytest.raises(ValueError, match="image"):
        make_views("audio", mean=None, std=None, hflip=False, generator=torch.Generator())


# -- backbones and nets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["preact_resnet18", "small_cnn"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32, 64])
def test_image_backbones_output_shapes(name, channels, size):
    encoder = make_encoder(name, in_channels=channels, image_size=size)
    encoder.train()
    out = encoder(torch.randn(2, channels, size, size))
    assert out.shape == (2, encoder.out_dim)


def test_preact_resnet18_64x64_variant_downsamples_in_the_stem():
    assert make_encoder("preact_resnet18", in_channels=3, image_size=64).stem.stride == (2, 2)
    assert make_encoder("preact_resnet18", in_channels=3, image_size=32).stem.stride == (1, 1)


def test_mlp_backbone_and_unknown_names():
    encoder = make_encoder("mlp", in_channels=0, image_size=0, in_dim=12)
    assert encoder(torch.randn(3, 12)).shape == (3, encoder.out_dim)
    with pytest.raises(ValueError, match="in_dim"):
        make_encoder("mlp", in_channels=0, image_size=0)
    with pytest.raises(KeyError, match="small_cnn"):
        make_encoder("vgg", in_channels=3, image_size=32)
    assert set(BACKBONES) == {"preact_resnet18", "small_cnn", "mlp", "clip_peft"}
    with pytest.raises(ValueError, match="clip_encoder_factory"):  # the annotator's CLIP, built elsewhere
        make_encoder("clip_peft", in_channels=3, image_size=32)


def test_net_gives_logits_and_unit_embeddings_in_one_pass():
    net = Net(make_encoder("small_cnn", in_channels=1, image_size=8), num_classes=5, proj_dim=16)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    logits, z = net.forward_with_embedding(x)
    assert logits.shape == (4, 5) and z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(net(x), logits)
    with pytest.raises(RuntimeError):
        Net(make_encoder("small_cnn", in_channels=1, image_size=8), 5, proj_dim=None).forward_with_embedding(x)


def test_seeded_builds_are_identical_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    with seeded(3):
        a = torch.nn.Linear(4, 4)
    with seeded(3):
        b = torch.nn.Linear(4, 4)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(torch.get_rng_state(), state)


# -- two networks, MixMatch batches ---------------------------------------------------------------


def _two_nets(seed: int = 0, **kwargs) -> TwoNets:
    ctx = BuildContext(
        num_classes=3, num_samples=10, make_encoder=lambda: make_encoder("mlp", in_channels=0, image_size=0, in_dim=4),
        train=TrainSettings(epochs=4, batch_size=4, lr=0.1), device=torch.device("cpu"), seed=seed,
    )  # fmt: skip
    return TwoNets(ctx, proj_dim=None, **kwargs)


def _feature_data(n: int = 10) -> TrainData:
    views = Views(plain=lambda x: x, weak=lambda x: x, strong=lambda x: x)
    return TrainData(x=torch.randn(n, 4), cand=torch.ones(n, 3), trusted=torch.zeros(n, dtype=torch.bool),
                     views=views, generator=torch.Generator().manual_seed(0))  # fmt: skip


def test_two_nets_step_one_net_predict_the_ensemble_and_round_trip_per_net_keys():
    pair, x = _two_nets(), torch.randn(5, 4)
    assert not torch.equal(pair.net_a(x), pair.net_b(x))  # two different initialisations
    before_b = [p.clone() for p in pair.net_b.parameters()]
    pair.step(0, pair.net_a(x).square().mean())
    assert all(torch.equal(p, q) for p, q in zip(before_b, pair.net_b.parameters()))  # only net A moved
    pair.step(1, pair.net_b(x).square().mean())
    logits_a, logits_b = pair.predict_nets(x)
    torch.testing.assert_close(pair.predict(x), logits_a + logits_b)
    assert pair.end_epoch() == pytest.approx(0.1) and pair.schedulers[1].last_epoch == 1
    state = pair.state_dict()
    assert set(state) == {f"{k}_{s}" for k in ("net", "optimizer", "scheduler") for s in "ab"}
    restored = _two_nets(seed=1)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.predict(x), pair.predict(x))
    assert set(per_net_state("queue", [KeyQueue(4, 2), KeyQueue(4, 2)])) == {"queue_a", "queue_b"}


def test_two_nets_warm_up_each_net_in_turn_and_train_one_against_its_peer():
    pair, data = _two_nets(), _feature_data()
    seen = [(i, net is pair.nets[i], net.training, len(idx)) for i, net, idx in pair.warmup_batches(data, 4)]
    assert [s[0] for s in seen] == [0, 0, 0, 1, 1, 1] and all(s[1] and s[2] for s in seen)
    assert sum(s[3] for s in seen) == 2 * 10
    net, peer = pair.train_against(1)
    assert net is pair.net_b and net.training and not peer.training
    assert labeled_fraction(1, torch.tensor([True, False, False, False])) == {"labeled_fraction_b": 0.25}
    assert _two_nets().schedulers[0].T_max == 4  # training.epochs
    assert _two_nets(period=800, eta_min_ratio=1e-3).schedulers[0].eta_min == pytest.approx(1e-4)


def test_split_batches_cover_the_labeled_split_once_with_cycled_unlabeled_batches():
    data = _feature_data()
    labeled = torch.arange(10) < 6
    batches = list(split_batches(data, 3, labeled))
    assert sorted(torch.cat([x for x, _, _ in batches]).tolist()) == list(range(6))
    assert all(labeled[x].all() and not labeled[u].any() and len(u) == 3 for x, u, _ in batches)
    assert [done for _, _, done in batches] == pytest.approx([0.0, 0.5])
    assert all(len(u) == 0 for _, u, _ in split_batches(data, 3, labeled, use_unlabeled=False))


def test_mixmatch_mixes_the_views_of_both_splits_and_splits_its_losses():
    g = torch.Generator().manual_seed(0)
    x1, x2, u1 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(1, 3, generator=g)
    tx, tu = torch.tensor([[1.0, 0.0, 0.0]] * 2), torch.tensor([[0.0, 0.5, 0.5]])
    mixed_x, mixed_t = mixmatch((x1, x2), (u1,), tx, tu, 4.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    lam = sample_mix_lambda(4.0, g)
    expected = mixup(torch.cat([x1, x2, u1]), torch.cat([tx, tx, tu]), lam, torch.randperm(5, generator=g))
    torch.testing.assert_close(mixed_x, expected[0])
    torch.testing.assert_close(mixed_t, expected[1])
    logits = torch.randn(5, 3, generator=g)
    loss_x, loss_u = mixmatch_losses(logits, mixed_t, 4)
    torch.testing.assert_close(loss_x, soft_ce(logits[:4], mixed_t[:4]).mean())
    torch.testing.assert_close(loss_u, squared_error(F.softmax(logits[4:], dim=1), mixed_t[4:]).mean())


# -- collapse diagnostics ------------------------------------------------------------------------


def test_collapse_diagnostics_on_crafted_embeddings_and_labels():
    from trainables.common.diagnostics import class_entropy, collapse_reason, mean_pairwise_cosine, prototype_cosine

    eye = torch.eye(4)
    assert mean_pairwise_cosine(eye) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(5, 3) * torch.arange(1, 6.0)[:, None]) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    assert class_entropy(torch.arange(10), 10) == pytest.approx(1.0)
    assert class_entropy(torch.zeros(7, dtype=torch.long), 10) == pytest.approx(0.0)
    assert class_entropy(torch.tensor([0, 1] * 50), 10) == pytest.approx(math.log(2) / math.log(10))
    protos = torch.zeros(3, 2)
    assert math.isnan(prototype_cosine(protos))  # none set yet
    protos[0], protos[2] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert prototype_cosine(protos) == pytest.approx(0.0)  # the unset row is left out
    assert collapse_reason({"diag/prediction_entropy": 0.9, "diag/embedding_cosine": 0.3}) == "none"
    assert collapse_reason({"diag/prediction_entropy": 0.3}) == "predictions"
    assert collapse_reason({"diag/prediction_entropy": 0.3, "diag/embedding_cosine_b": 0.99}) == "predictions+embedding"


def test_embedding_diagnostics_see_a_collapsed_projector():
    from trainables.common.diagnostics import embedding_diagnostics
    from trainables.common.moco import make_key_net
    from trainables.common.nets import Net

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
    encoder.out_dim = 8
    net = Net(encoder, 3, proj_dim=4)
    probe = torch.randn(32, 1, 4, 4)
    healthy = embedding_diagnostics(net, probe, make_key_net(net))
    assert healthy["key_query_distance"] == pytest.approx(0.0, abs=1e-6)  # the key net is a copy
    with torch.no_grad():  # every output on one direction, large: the PiCO-switch collapse
        net.projector[-1].weight.zero_()
        net.projector[-1].bias.copy_(torch.tensor([30.0, 40.0, 0.0, 0.0]))
    collapsed = embedding_diagnostics(net, probe)
    assert collapsed["embedding_cosine"] == pytest.approx(1.0) and collapsed["embedding_norm"] == pytest.approx(50.0)
    assert healthy["embedding_cosine"] < 0.9


def test_class_balanced_clean_set_gives_each_guessed_class_an_equal_quota():
    from trainables.common.gmm import class_balanced_clean_set, clean_set

    # 10 samples guessed class 0 (all confident), 4 guessed class 1 (none above the threshold), 6 class 2
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 6)
    w = torch.cat([torch.linspace(0.99, 0.9, 10), torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.linspace(0.8, 0.3, 6)])
    trusted = torch.zeros(20, dtype=torch.bool)
    trusted[13] = True  # the least clean sample of class 1, revealed: always kept
    plain = clean_set(w, trusted, 0.5)
    assert plain.nonzero().flatten().tolist() == list(range(10)) + [13, 14, 15, 16]  # class 0 takes 10 of the 13
    balanced = class_balanced_clean_set(w, trusted, 0.5, labels, 3)
    # 13 above the threshold: a quota of round(13 / 3) = 4 per class, the highest w first, trusted on top
    assert balanced.nonzero().flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17]


def test_partial_set_guesses_classes_from_the_split_makers_predictions_within_s():
    from trainables.common.gmm import partial_set

    cand = torch.tensor([[1.0, 1.0, 0.0]] * 4 + [[0.0, 1.0, 1.0]] * 2)
    probs = torch.tensor([[0.1, 0.2, 0.7]] * 4 + [[0.8, 0.1, 0.1]] * 2)  # argmax outside S for all
    data = TrainData(x=torch.zeros(6, 1), cand=cand, trusted=torch.zeros(6, dtype=torch.bool), views=None, generator=None)
    w = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.1])
    # within S the guesses are class 1 for every sample: one guessed class, quota round(5 / 3) = 2
    assert partial_set(w, data, 0.5, probs, balanced=True).nonzero().flatten().tolist() == [0, 4]
    assert partial_set(w, data, 0.5, probs, balanced=False).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
