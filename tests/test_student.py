"""The deployable student: a trained trial's model as an MLflow pyfunc model that predicts what the
trial predicted, from raw images, also where the project is not installed."""

from __future__ import annotations

import dataclasses

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.annotation.stage import annotate
from orchestrator.config import parse_grid
from orchestrator.plan import expand
from orchestrator.student import (
    STUDENT_PATH,
    _with_logged_epochs,
    has_parameters,
    load_trained,
    log_student,
    log_trial_artifacts,
)
from trainables.data.datasets import load_dataset
from trainables.loop import PREDICTIONS_FILE, predict
from trainables.registry import ALGORITHMS

from helpers import train_with_checkpoints

EPOCHS = 3


def tiny_config(tmp_path: Path, method: str, **params):
    grid = parse_grid(
        {
            "experiment": "student",
            "storage": str(tmp_path),
            "datasets": [{"name": "digits", "subsample": 300, "test_subsample": 150}],
            "annotators": [{"kind": "synthetic"}],
            "grid": {"q": [0.3], "eta": [0.3], "seeds": [3]},
            "training": {"epochs": EPOCHS, "batch_size": 32, "backbone": "small_cnn"},
            "methods": [{"name": method, "params": params}],
        }
    )
    study = expand(grid)[0]
    dataset = load_dataset(study.cell.dataset)
    ann = annotate(dataset, study.cell.annotator, q=0.3, eta=0.3, seed=3, cache_dir=tmp_path / "annotations")
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp_path / "annotations"), cpus=1, device="cpu")
    return config


@pytest.fixture(scope="module")
def trial(tmp_path_factory, one_thread):
    """A finished 3-epoch PRODEN trial: (its spec, its reported metrics per epoch, checkpoint dir, data set)."""
    tmp = tmp_path_factory.mktemp("student")
    config = tiny_config(tmp, "proden")
    checkpoint = tmp / "checkpoint"
    reported = train_with_checkpoints(config, checkpoint)
    from orchestrator.student import driver_dataset

    return config, reported, checkpoint, driver_dataset(config)


@pytest.fixture(scope="module")
def logged(trial, tmp_path_factory):
    """The trial's student logged to a sqlite MLflow store: (client, run id, model URI)."""
    _, _, checkpoint, dataset = trial
    tmp = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.create_experiment("student", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    assert log_student(client, run_id, checkpoint, dataset)
    return client, run_id, f"{client.get_run(run_id).info.artifact_uri}/{STUDENT_PATH}"


def test_student_predicts_what_the_trial_predicted(trial, logged):
    config, reported, checkpoint, dataset = trial
    last = reported[-1]
    client, run_id, uri = logged
    assert "MLmodel" in [Path(a.path).name for a in client.list_artifacts(run_id, STUDENT_PATH)]
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(dataset.test_x)  # raw (N, 1, 8, 8) uint8 images
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["class_id", "class_name", "probability"]

    trial_pred = np.load(checkpoint / PREDICTIONS_FILE)["test_pred"]  # what run_trial predicted at its last epoch
    np.testing.assert_array_equal(out["class_id"].to_numpy(), trial_pred)
    algo, _, _ = load_trained(checkpoint, dataset)
    from trainables.common.augment import make_views

    plain = make_views("image", mean=dataset.mean, std=dataset.std, hflip=False, generator=torch.Generator()).plain
    own = predict(algo, torch.as_tensor(dataset.test_x), plain).argmax(1).numpy()
    np.testing.assert_array_equal(out["class_id"].to_numpy(), own)
    assert (out["class_id"].to_numpy() == dataset.test_y).mean() == pytest.approx(last["test/acc"], abs=1e-6)
    assert out["class_name"].tolist() == [dataset.class_names[i] for i in trial_pred]
    assert ((out["probability"] > 0) & (out["probability"] <= 1)).all()

    # grey images may also come as (N, H, W) to the unwrapped model
    grey = model.unwrap_python_model().predict(None, dataset.test_x[:, 0])
    np.testing.assert_array_equal(grey["class_id"].to_numpy(), trial_pred)


def test_student_carries_class_names_preprocessing_and_signature(trial, logged):
    config, _, _, dataset = trial
    model = mlflow.pyfunc.load_model(logged[2])
    meta = model.metadata.metadata
    assert meta["class_names"] == list(dataset.class_names) and meta["method"] == "proden"
    pre = meta["preprocessing"]
    assert (pre["kind"], pre["dtype"], pre["input_shape"]) == ("image", "uint8", [1, 8, 8])
    assert pre["mean"] == pytest.approx(list(dataset.mean)) and pre["std"] == pytest.approx(list(dataset.std))
    (spec,) = model.metadata.get_input_schema().inputs
    assert (spec.type, spec.shape) == (np.dtype("uint8"), (-1, 1, 8, 8))
    assert model.metadata.get_output_schema().input_names() == ["class_id", "class_name", "probability"]
    with pytest.raises(Exception, match="dtype"):
        model.predict(dataset.test_x.astype(np.float32))  # the signature refuses un-preprocessed floats


def test_student_loads_without_the_project_installed(trial, logged, tmp_path):
    """A fresh interpreter that cannot import the project's packages (editable install hidden):
    the model's shipped code is all it needs."""
    _, _, checkpoint, dataset = trial
    np.save(tmp_path / "x.npy", dataset.test_x[:20])
    script = f"""
import os, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
root = {str(Path(__file__).resolve().parents[1])!r}
sys.path = [p for p in sys.path if p and os.path.realpath(p) != root]
for name in ("orchestrator", "trainables"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable: the check would prove nothing")
    except ImportError:
        pass
import json, numpy as np, mlflow
model = mlflow.pyfunc.load_model({logged[2]!r})
print(json.dumps(model.predict(np.load("x.npy"))["class_id"].tolist()))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert ids == np.load(checkpoint / PREDICTIONS_FILE)["test_pred"][:20].tolist()


def test_mlflow_models_serve_answers_with_the_trials_predictions(trial, logged, tmp_path):
    """``mlflow models serve`` (the deployment path the README gives) over HTTP, JSON in and out."""
    import urllib.request

    from servers import env_with_venv_bin, free_port, serving

    _, _, checkpoint, dataset = trial
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged[2], "--env-manager", "local",
           "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]  # fmt: skip
    with serving(cmd, f"{url}/ping", tmp_path / "serve.log", env=env_with_venv_bin(MLFLOW_TRACKING_URI=logged[0].tracking_uri)):
        body = json.dumps({"inputs": dataset.test_x[:25].tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        predictions = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    trial_pred = np.load(checkpoint / PREDICTIONS_FILE)["test_pred"][:25]
    assert [p["class_id"] for p in predictions] == trial_pred.tolist()
    assert [p["class_name"] for p in predictions] == [dataset.class_names[i] for i in trial_pred]


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_has_a_network_to_deploy(method):
    """A student needs trained parameters: every registered method has them (Co-Reg's and
    DivideMix's in their two networks), so every finished trial gets a student."""
    from helpers import tiny_clip, tiny_vlm
    from trainables.api import BuildContext, TrainSettings
    from trainables.common.backbones import make_encoder

    spec = ALGORITHMS[method]
    ctx = BuildContext(
        num_classes=10,
        num_samples=8,
        make_encoder=lambda: make_encoder("small_cnn", in_channels=1, image_size=8),
        train=TrainSettings(epochs=1),
        device=torch.device("cpu"),
        seed=0,
        clip=tiny_clip(10) if spec.needs_clip else None,  # CoOp's prompts are for the annotator's CLIP
        vlm=tiny_vlm(10) if spec.needs_vlm else None,  # vlm_lora adapts the annotator's VLM
    )
    algo = spec.build(spec.params(), ctx)
    assert has_parameters(algo)
    if spec.needs_vlm:  # LoRA's B starts at 0 whatever the seed: stand in for training with random adapters
        with torch.no_grad():
            for name, p in algo.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))

    # The student ships only the networks predict() runs, and they give the same predictions.
    from orchestrator.student import inference_state, load_inference_state

    shape = (4, 3, 32, 32) if spec.needs_clip else (4, 1, 8, 8)  # CLIP inputs: the tiny CLIP's transform
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    if spec.needs_vlm:
        x = x.sigmoid()  # a VLM's inputs are images in [0, 1]
    networks = inference_state(algo, x)
    assert networks and all(not k.startswith(("optimizer", "scheduler")) for k in networks)
    shipped = {name for state in networks.values() for name in state}
    assert not any("queue" in name for name in shipped), sorted(shipped)  # MoCo queues stay in the checkpoint
    torch.manual_seed(1)
    fresh = spec.build(spec.params(), dataclasses.replace(ctx, seed=1, vlm=tiny_vlm(10) if spec.needs_vlm else None))
    assert not torch.allclose(fresh.predict(x), algo.predict(x))  # other initial weights
    load_inference_state(fresh, networks)
    torch.testing.assert_close(fresh.predict(x), algo.predict(x))
    if spec.needs_clip or spec.needs_vlm:  # the frozen CLIP / VLM is not in the checkpoint (the annotator's), but the student ships it
        return
    assert sum(v.numel() for state in networks.values() for v in state.values()) <= sum(
        v.numel() for v in _tensors(algo.state_dict())
    )


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def test_a_method_without_parameters_is_refused_a_student(trial, logged, monkeypatch):
    _, _, checkpoint, dataset = trial
    import orchestrator.student as student

    monkeypatch.setattr(student, "load_trained", lambda *_: (object(), {}, {"config": {"method": "none"}}))
    client = logged[0]
    run_id = client.create_run(client.get_run(logged[1]).info.experiment_id).info.run_id
    with pytest.raises(ValueError, match="no trainable parameters"):
        log_student(client, run_id, checkpoint, dataset)
    assert client.list_artifacts(run_id) == []


class _Checkpoint:
    """Tune's Checkpoint as the callback sees it (``as_directory``), over a local directory."""

    def __init__(self, path: Path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.path))


def test_a_finished_trial_gets_plots_and_a_student(trial, logged):
    """What the driver's MLflow callback logs when a trial completes (without Ray)."""
    config, reported, checkpoint, _ = trial
    client = logged[0]
    run_id = client.create_run(client.get_run(logged[1]).info.experiment_id).info.run_id
    history = [{**m, "epoch": i} for i, m in enumerate(reported, 1)]
    logged_paths = log_trial_artifacts(client, run_id, config, history, _Checkpoint(checkpoint))
    # PRODEN has no clean split: no clean_split.png; the last checkpoint's predictions give the confusion matrix
    assert sorted(logged_paths) == ["plots/confusion_matrix.png", "plots/learning_curves.png", "student/MLmodel"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == sorted(logged_paths)[:2]
    assert log_trial_artifacts(client, run_id, config, history, None) == ["plots/learning_curves.png"]  # no checkpoint


def test_a_resumed_trial_plots_the_epochs_an_earlier_driver_logged(logged):
    client = logged[0]
    run_id = client.create_run(client.get_run(logged[1]).info.experiment_id).info.run_id
    for epoch in (1, 2, 3):
        client.log_metric(run_id, "test/acc", 0.1 * epoch, step=epoch)
    resumed = [{"epoch": 3, "test/acc": 0.33}, {"epoch": 4, "test/acc": 0.4}]  # from the checkpoint of epoch 2 on
    history = _with_logged_epochs(client, run_id, resumed)
    assert [(r["epoch"], r["test/acc"]) for r in history] == [(1, 0.1), (2, 0.2), (3, 0.33), (4, 0.4)]


def test_the_student_is_a_registrable_logged_model_with_its_size_reported(trial, logged, tmp_path, monkeypatch):
    client, run_id, _ = logged
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string="name = 'proden-student'")
    (model,) = [m for m in found if m.source_run_id == run_id]
    assert str(model.status).endswith("READY") and model.tags["method"] == "proden"
    assert {a.path for a in client.list_logged_model_artifacts(model.model_id)} >= {"MLmodel", "artifacts"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # the registry resolves models:/ there
    version = mlflow.register_model(f"models:/{model.model_id}", "digits-student")
    assert str(version.version) == "1" and version.run_id == run_id
    registered = mlflow.pyfunc.load_model("models:/digits-student/1")
    assert registered.metadata.metadata["method"] == "proden"
    loaded = mlflow.pyfunc.load_model(client.download_artifacts(run_id, "student", str(tmp_path)))
    assert loaded.metadata.metadata["method"] == "proden"
    # only the network predict() runs: the shipped weights file is a fraction of the checkpoint
    size_kb = int(run.data.tags["student_kb"])
    weights = Path(client.download_artifacts(run_id, "student/artifacts/networks.pt", str(tmp_path / "w")))
    from trainables.loop import CHECKPOINT_FILE

    checkpoint_file = trial[2] / CHECKPOINT_FILE
    assert weights.stat().st_size < checkpoint_file.stat().st_size / 2
    assert 0 < size_kb < 1024, size_kb
