"""The training loop without Ray: splits, label isolation, determinism, checkpoint resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.annotation.stage import annotate
from orchestrator.config import parse_grid
from orchestrator.plan import expand
from trainables.common.batches import eval_batch_size
from trainables.data.datasets import load_dataset
from trainables.loop import make_split, prepare_data, run_trial
from trainables.spec import TrialSpec


def test_split_is_seeded_disjoint_and_reveals_k_per_class():
    labels = np.repeat(np.arange(5), 40)
    a = make_split(labels, 5, val_fraction=0.2, shots=3, fraction=0.5, seed=7)
    b = make_split(labels, 5, val_fraction=0.2, shots=3, fraction=0.5, seed=7)
    c = make_split(labels, 5, val_fraction=0.2, shots=3, fraction=0.5, seed=8)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    assert len(a.val) == 40 and not set(a.val) & set(a.train)
    revealed = a.train[a.trusted]
    assert np.bincount(labels[revealed], minlength=5).tolist() == [3] * 5
    unlabeled_pool = 200 - 40 - 15
    assert (~a.trusted).sum() == round(0.5 * unlabeled_pool)


def tiny_config(tmp_path: Path, method: str, **params) -> TrialSpec:
    grid = parse_grid(
        {
            "experiment": "loop",
            "storage": str(tmp_path),
            "datasets": [{"name": "digits", "subsample": 300}],
            "annotators": [{"kind": "synthetic"}],
            "grid": {"q": [0.3], "eta": [0.3], "seeds": [3], "shots": [2]},
            "training": {"epochs": 4, "batch_size": 32, "backbone": "small_cnn"},
            "methods": [{"name": method, "params": params}],
        }
    )
    study = expand(grid)[0]
    dataset = load_dataset(study.cell.dataset)
    ann = annotate(dataset, study.cell.annotator, q=0.3, eta=0.3, seed=3, cache_dir=tmp_path / "annotations")
    return study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp_path / "annotations"), cpus=1, device="cpu")


def collect(config: TrialSpec, **kwargs) -> list[dict]:
    out: list[dict] = []
    run_trial(config, lambda metrics, save: out.append(dict(metrics)), **kwargs)
    return out


def test_training_data_carries_candidates_not_truth(tmp_path):
    config = tiny_config(tmp_path, "cc")
    td = prepare_data(config, torch.device("cpu"))
    cand, truth = td.data.cand, td.train_y
    untrusted = ~td.data.trusted
    in_set = cand[untrusted].gather(1, truth[untrusted, None]).squeeze(1)
    # eta = 0.3: a sizeable share of the training targets exclude the true label
    assert 0.15 < 1 - in_set.mean().item() < 0.45
    # revealed few-shot samples carry exactly their true label
    trusted = td.data.trusted
    assert torch.equal(cand[trusted].argmax(1), truth[trusted]) and (cand[trusted].sum(1) == 1).all()
    assert trusted.sum().item() == 2 * 10


@pytest.mark.parametrize("method", ["cc", "coreg"])
def test_same_config_and_seed_give_the_same_first_epoch(tmp_path, method):
    params = {"warmup_epochs": 1} if method == "coreg" else {}
    config = tiny_config(tmp_path, method, **params)
    first = collect(config, max_epochs=2)
    second = collect(config, max_epochs=2)
    for a, b in zip(first, second):
        losses = [k for k in a if k.startswith("train/")]
        assert losses and set(a) == set(b)
        for key in losses + ["test/acc", "pl/acc"]:
            assert a[key] == b[key], key
    other = config.replace(cell=dataclasses.replace(config.cell, seed=4))
    assert collect(other, max_epochs=1)[0]["train/loss"] != first[0]["train/loss"]


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    config = tiny_config(tmp_path, "proden")
    full = collect(config)
    saved = tmp_path / "ckpt"
    saved.mkdir()

    def report(metrics, save):
        if metrics["epoch"] == 2:
            save(saved)

    run_trial(config, report, max_epochs=2)
    resumed = collect(config, restore_dir=saved)
    assert [m["epoch"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["test/acc"] == pytest.approx(b["test/acc"], abs=1e-6)


def test_a_trial_restored_from_its_last_checkpoint_reports_its_last_result_again(tmp_path):
    """The last epoch was trained and checkpointed, but the trial was never recorded as finished
    (the disk filled as its run was ended): resumed, it reports the same last result, not nothing."""
    config = tiny_config(tmp_path, "cc")
    saved = tmp_path / "ckpt"
    saved.mkdir()
    full: list[dict] = []

    def report(metrics, save):
        full.append(dict(metrics))
        if metrics["epoch"] == 4:
            save(saved)

    run_trial(config, report)
    again: list[tuple[dict, bool]] = []
    again_dir = tmp_path / "again"
    again_dir.mkdir()

    def report_again(metrics, save):
        again.append((dict(metrics), save is not None))
        save(again_dir)

    run_trial(config, report_again, restore_dir=saved)
    assert again == [(full[-1], True)]  # the epoch-4 result, with a checkpoint, no epoch retrained
    assert (again_dir / "predictions.npz").is_file()  # the confusion matrix still has its predictions


@pytest.mark.parametrize("method", ["cc", "pico", "coreg"])
def test_every_epoch_logs_label_free_collapse_diagnostics(tmp_path, method):
    params = {"warmup_epochs": 1, "warmup_steps": 0, "contrastive_start": 0} if method == "coreg" else {}
    history = collect(tiny_config(tmp_path, method, **params), max_epochs=2)
    diag = {k for k in history[-1] if k.startswith("diag/")}
    expected = {"diag/prediction_entropy", "diag/prediction_confidence", "diag/collapsed"}
    if method == "pico":
        expected |= {f"diag/{k}" for k in ("embedding_norm", "embedding_cosine", "key_query_distance", "prototype_cosine", "queue_label_entropy")}
    if method == "coreg":
        expected |= {"diag/prototype_cosine", "diag/embedding_cosine_a", "diag/key_query_distance_b", "diag/queue_label_entropy_a"}
    assert expected <= diag and (method != "cc" or diag == expected)
    for epoch in history:
        assert 0.0 < epoch["diag/prediction_entropy"] <= 1.0 and epoch["diag/collapsed"] in (0.0, 1.0)
        assert 0.1 <= epoch["diag/prediction_confidence"] <= 1.0  # 10 classes: at least 1 / C


def test_two_network_methods_run_the_test_set_once_through_each_net(tmp_path, monkeypatch):
    from trainables import loop
    from trainables.common.two_net import TwoNets

    calls = {"predict": 0, "predict_nets": 0}
    for name in calls:
        original = getattr(TwoNets, name)
        monkeypatch.setattr(TwoNets, name, lambda self, x, _o=original, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _o(self, x))
    config = tiny_config(tmp_path, "coreg", warmup_epochs=1)
    td = prepare_data(config, torch.device("cpu"))
    algo = loop.build_algorithm(config, td, torch.device("cpu"))
    metrics = loop.evaluate(algo, td)
    test_batches, val_batches = (-(-len(x) // eval_batch_size(x.device)) for x in (td.test_x, td.val_x))
    # the test set once through both nets; predict() (itself through predict_nets) for the validation split only
    assert calls["predict"] == val_batches and calls["predict_nets"] == test_batches + val_batches
    logits_a, logits_b = algo.predict_nets(td.data.views.plain(td.test_x))
    ensemble = ((logits_a + logits_b).argmax(1) == td.test_y).float().mean().item()
    assert metrics["test/acc"] == pytest.approx(ensemble)


def test_trial_curve_script_prints_one_line_per_epoch(tmp_path, capsys, one_thread):
    """scripts/trial_curve.py (the README's single-trial curves) runs a trial through the real loop."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "trial_curve.py"
    spec = importlib.util.spec_from_file_location("trial_curve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--subsample", "120", "--test-subsample", "60", "--epochs", "2", "--method", "coreg",
                 "--params", '{"warmup_epochs": 1}', "--storage", str(tmp_path), "--keys", "epoch,test/acc,split/fraction"])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("epoch") for line in lines[:2]] == [1, 2] and "total_s" in lines[2]
    assert set(lines[0]) == {"epoch", "test/acc"} and set(lines[1]) == {"epoch", "test/acc", "split/fraction"}
    assert (tmp_path / "annotations").is_dir()
