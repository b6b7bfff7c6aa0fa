"""DivideMix and KD: the methods that learn from the CLIP annotator's outputs.

Hand-made tensors pin each method's own pieces (co-divide, co-refinement, the distillation loss);
a crafted CLIP annotation (per-template probabilities chosen by hand, derived by the real
annotation stage) pins what reaches each method and the zero-shot accuracies it records (the
tables' zero-shot rows); one end-to-end test runs both through ``run_trial`` on an annotation made
by a random tiny open_clip model.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.annotation import clip as clip_mod
from orchestrator.annotation.clip import ClipActor, actor_kwargs
from orchestrator.annotation.stage import annotate
from orchestrator.config import ClipAnnotatorSpec, DatasetSpec, GridError, parse_grid
from orchestrator.plan import expand
from trainables import dividemix, kd
from helpers import tiny_ctx, tiny_data, tiny_images
from trainables.api import BuildContext, TrainData
from trainables.data.datasets import load_dataset
from trainables.common.metrics import MeanMeter
from trainables.common.targets import co_guess, co_refine
from trainables.dividemix import DivideMixParams, uniform_prior_penalty
from trainables.kd import distillation_loss, teacher_targets
from trainables.loop import prepare_data, run_trial

N, C = 40, 4
TINY_CONFIG = Path(__file__).parent / "fixtures" / "tiny_clip.json"
DIGITS = {"name": "digits", "subsample": 100, "test_subsample": 40}
THREE_TEMPLATES = ("a photo of a {}", "a drawing of a {}", "a sketch of a {}")

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(trusted: int = 1) -> TrainData:
    g = torch.Generator().manual_seed(0)
    x = tiny_images(N, g)
    noisy = torch.randint(0, C, (N,), generator=g)
    soft = torch.softmax(torch.randn(N, C, generator=g), dim=1)
    return tiny_data(x, F.one_hot(noisy, C).float(), torch.arange(N) < trusted, hflip=False, soft=soft)


def _ctx() -> BuildContext:
    return tiny_ctx(N, C, epochs=2, batch_size=8)


# -- DivideMix -----------------------------------------------------------------------------------


def _crafted_losses() -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample losses of net A (high on samples 0-9) and net B (high on samples 10-19)."""
    idx = torch.arange(N)
    high_a, high_b = idx < 10, (idx >= 10) & (idx < 20)
    jitter = 0.05 * torch.rand(2, N, generator=torch.Generator().manual_seed(3))
    losses = {0: torch.where(high_a, 2.0, 0.1) + jitter[0], 1: torch.where(high_b, 2.0, 0.1) + jitter[1]}
    return losses, high_a, high_b


# _train_net is replaced by a stand-in, so the epoch's schedule step comes without an optimiser step
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_co_divide_puts_a_nets_high_loss_samples_in_its_peers_unlabeled_split():
    data = _data(trusted=1)  # sample 0 is trusted, and net A finds it noisy
    algo = dividemix.SPEC.build(DivideMixParams(warmup_epochs=0), _ctx())
    losses, high_a, high_b = _crafted_losses()
    algo._sample_losses = lambda i, data, labels: losses[i]
    calls = []

    def record(me, data, epoch, labeled, w, labels):
        calls.append((me, labeled.clone(), w.clone()))
        return MeanMeter()

    algo._train_net = record
    algo.train_epoch(data, 0)

    (first, labeled_a, _), (second, labeled_b, w_b) = calls
    assert (first, second) == (0, 1)
    assert torch.equal(~labeled_a, high_b)  # net A trains on the split net B made
    assert torch.equal(~labeled_b, high_a & ~data.trusted)  # and B on A's; trusted samples stay labeled
    assert w_b[0] == 1.0 and (w_b[1:10] < 0.5).all() and (w_b[10:] > 0.5).all()
    assert torch.equal(algo.clean_mask(), labeled_a | labeled_b)


def test_training_targets_refine_labeled_samples_and_guess_unlabeled_ones():
    data = _data(trusted=1)
    algo = dividemix.SPEC.build(DivideMixParams(warmup_epochs=0), _ctx())
    losses, _, high_b = _crafted_losses()
    algo._sample_losses = lambda i, data, labels: losses[i]
    algo.train_epoch(data, 0)
    # the trusted sample has w = 1: its refined target is its label exactly (w y + 0 * p, sharpened)
    torch.testing.assert_close(algo.targets[:, 0], data.cand[[0, 0]])
    # net A's unlabeled samples (B's high losses) get guesses, not their noisy labels
    guessed = algo.targets[0, high_b]
    assert not torch.equal(guessed, data.cand[high_b])
    torch.testing.assert_close(guessed.sum(1), torch.ones(int(high_b.sum())))


def test_co_refinement_and_co_guessing_formulas():
    w = torch.tensor([0.7])
    label = torch.tensor([[0.0, 1.0, 0.0]])
    own = torch.tensor([[0.2, 0.5, 0.3]])
    # 0.7 * y + 0.3 * own = [0.06, 0.85, 0.09]; sharpened with T = 0.5: squares / their sum
    expected = torch.tensor([[0.0036, 0.7225, 0.0081]]) / 0.7342
    torch.testing.assert_close(co_refine(w, label, own, 0.5), expected)
    views = [torch.tensor([[0.6, 0.4]]), torch.tensor([[0.2, 0.8]]), torch.tensor([[0.4, 0.6]]), torch.tensor([[0.4, 0.6]])]  # fmt: skip
    # mean of the four = [0.4, 0.6]; sharpened: [0.16, 0.36] / 0.52
    torch.testing.assert_close(co_guess(views, 0.5), torch.tensor([[0.16, 0.36]]) / 0.52)


def test_uniform_prior_penalty():
    logits = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).log()  # mean prediction [0.7, 0.3]
    expected = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert uniform_prior_penalty(logits).item() == pytest.approx(expected)
    assert uniform_prior_penalty(torch.tensor([[2.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("spec", [dividemix.SPEC, kd.SPEC])
def test_starred_selects_the_template_average(spec):
    single, starred = spec.consumes_for(spec.params()), spec.consumes_for({"starred": True})
    assert single == spec.consumes and single in ("noisy_label", "soft_single")
    assert starred == {"noisy_label": "noisy_label_avg", "soft_single": "soft"}[single]


# -- KD -------------------------------------------------------------------------------------------


def test_distillation_loss_value_and_gradient_point_at_the_teacher():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # p = [0.25, 0.75]
    loss = distillation_loss(logits, torch.tensor([[0.5, 0.5]]), temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25]]))  # p - q: descent moves p to q

    # T = 2: the teacher [0.8, 0.2] softens to [2/3, 1/3]; the student's logits / 2 give [0.25, 0.75]
    logits = torch.tensor([[0.0, math.log(9.0)]], requires_grad=True)
    loss = distillation_loss(logits, torch.tensor([[0.8, 0.2]]), temperature=2.0)
    expected = 4 * (2 / 3 * math.log((2 / 3) / 0.25) + 1 / 3 * math.log((1 / 3) / 0.75))
    assert loss.item() == pytest.approx(expected)
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, 2 * torch.tensor([[0.25 - 2 / 3, 0.75 - 1 / 3]]))


def test_kd_learns_from_the_annotator_probabilities_and_revealed_labels():
    data = _data(trusted=2)
    targets = teacher_targets(data)
    torch.testing.assert_close(targets[:2], data.cand[:2])
    torch.testing.assert_close(targets[2:], data.soft[2:])
    algo = kd.SPEC.build(kd.KDParams(temperature=2.0), _ctx())
    algo.train_epoch(data, 0)
    torch.testing.assert_close(algo.pseudo_labels()[2:], F.normalize(data.soft[2:] ** 0.5, p=1, dim=1))
    with pytest.raises(ValueError, match="only a CLIP annotation"):
        teacher_targets(dataclasses.replace(data, soft=None))


# -- a crafted CLIP annotation through the loop ------------------------------------------------


def _crafted_probs(y: np.ndarray) -> np.ndarray:
    """(n, 3, 10): template 0 is right on even samples, templates 1-2 (hence the average) unless i % 3 == 0."""
    i = np.arange(len(y))
    first = np.where(i % 2 == 0, y, (y + 1) % 10)
    others = np.where(i % 3 != 0, y, (y + 2) % 10)
    probs = np.full((len(y), 3, 10), 0.3 / 9)
    probs[i, 0, first] = 0.7
    probs[i, 1, others] = 0.7
    probs[i, 2, others] = 0.7
    return probs.astype(np.float16)


def _config(tmp_path: Path, method: str, annotation_key: str, annotator: dict, epochs: int = 2, **params) -> dict:
    grid = parse_grid(
        {
            "experiment": "noisy_label",
            "storage": str(tmp_path),
            "datasets": [DIGITS],
            "annotators": [annotator],
            "grid": {"seeds": [0]},
            "training": {"epochs": epochs, "batch_size": 16, "backbone": "small_cnn"},
            "methods": [{"name": method, "params": params}],
        }
    )
    config = expand(grid)[0].trial_config({}, annotation_key=annotation_key, cache_dir=str(tmp_path / "ann"), cpus=1, device="cpu")
    return config


def _annotate(tmp_path: Path, monkeypatch, annotator: dict, probs_fn) -> tuple:
    """The real annotation stage on digits, with the CLIP model call replaced by ``probs_fn``."""
    dataset = load_dataset(DatasetSpec(**DIGITS))
    monkeypatch.setattr(clip_mod, "annotate_clip", probs_fn)
    ann = annotate(dataset, ClipAnnotatorSpec(**annotator), cache_dir=tmp_path / "ann")
    return dataset, ann


def _collect(config: dict, tmp_path: Path) -> list[dict]:
    out: list[dict] = []

    def report(metrics: dict, save) -> None:
        out.append(dict(metrics))
        if save is not None:
            save(tmp_path)  # the last checkpoint also writes the test predictions

    run_trial(config, report)
    return out


TINY = {"kind": "clip", "pretrained": None, "model_config_path": str(TINY_CONFIG)}
CRAFTED = {**TINY, "templates": list(THREE_TEMPLATES)}


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    def crafted_model(ds, spec, names, progress=None):
        return _crafted_probs(ds.train_y), _crafted_probs(ds.test_y)

    return _annotate(tmp_path, monkeypatch, CRAFTED, crafted_model)


def test_the_crafted_annotation_records_the_zero_shot_accuracies(crafted):
    """The tables' zero-shot rows are these statistics of the annotation (single template; average)."""
    dataset, ann = crafted
    single = float((ann.probs_test[:, 0].argmax(1) == dataset.test_y).mean())
    average = float((ann.probs_test.astype(np.float32).mean(1).argmax(1) == dataset.test_y).mean())
    assert ann.stats["zs_acc_test"] == pytest.approx(single) == pytest.approx(0.5)
    assert ann.stats["zs_acc_avg_test"] == pytest.approx(average) == pytest.approx(26 / 40)


@pytest.mark.parametrize("starred", [False, True])
def test_kd_and_dividemix_receive_the_single_template_or_the_average(tmp_path, crafted, starred):
    _, ann = crafted
    td = prepare_data(_config(tmp_path, "kd", ann.key, CRAFTED, starred=starred), torch.device("cpu"))
    probs = ann.probs_train[td.split.train].astype(np.float32)
    expected = probs.mean(1) if starred else probs[:, 0]
    expected = expected / expected.sum(1, keepdims=True)
    torch.testing.assert_close(td.data.soft, torch.as_tensor(expected))
    td = prepare_data(_config(tmp_path, "dividemix", ann.key, CRAFTED, starred=starred), torch.device("cpu"))
    assert torch.equal(td.data.cand.argmax(1), torch.as_tensor(expected.argmax(1)))
    assert (td.data.cand.sum(1) == 1).all()


@pytest.mark.parametrize(
    "method, params, kind",
    [
        ("dividemix", {}, "noisy_label"),
        ("dividemix", {"starred": True}, "noisy_label_avg"),
        ("kd", {}, "soft_single"),
        ("kd", {"starred": True}, "soft"),
    ],
)
def test_config_needs_a_clip_annotator(method, params, kind):
    raw = {
        "experiment": "x",
        "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}],
        "grid": {"q": [0.3], "eta": [0.3]},
        "methods": [{"name": method, "params": params}],
    }
    with pytest.raises(GridError, match=f"{method} learns from {kind}, which the synthetic annotator"):
        parse_grid(raw)
    parse_grid({**raw, "annotators": [{"kind": "clip"}], "grid": {}})


# -- end to end on a random tiny open_clip model -----------------------------------------------


def test_run_trial_end_to_end_on_a_tiny_clip_annotation(tmp_path, monkeypatch):
    tiny = TINY

    def direct(ds, spec, names, progress=None):  # the actor itself, without the Ray Data pool
        images = np.concatenate([ds.train_x, ds.test_x])
        probs = ClipActor(**actor_kwargs(spec, names))({"index": np.arange(len(images)), "image": images})["probs"]
        return probs[: len(ds.train_x)], probs[len(ds.train_x) :]

    _, ann = _annotate(tmp_path, monkeypatch, tiny, direct)
    assert ann.probs_train.shape == (100, 27, 10)
    for method, params in (("kd", {}), ("dividemix", {"warmup_epochs": 1, "starred": True})):
        history = _collect(_config(tmp_path, method, ann.key, tiny, epochs=3, **params), tmp_path)
        assert len(history) == 3 and all(math.isfinite(v) for m in history for v in m.values())
        assert 0.0 <= history[-1]["test/acc"] <= 1.0 and "train/loss" in history[-1]
    assert "split/precision" in history[-1]  # DivideMix divided after its warm-up
