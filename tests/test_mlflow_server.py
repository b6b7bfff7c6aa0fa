"""A tiny sweep against a real ``mlflow server`` (the cluster setup): runs, statuses and artifacts
over HTTP, then the MLflow UI checked in a real headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from orchestrator.config import load_grid
from orchestrator.sweep import run
from servers import free_port, serving

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
UI_CHECK = ROOT / "scripts" / "mlflow_ui_check.py"
EXPERIMENT = "server-e2e"
EPOCHS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free localhost port: sqlite backend, artifacts proxied over HTTP into
    its own directory (``--artifacts-destination``), as on the cluster's head node. Yields (URL,
    artifact directory)."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers on 2 cores
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, f"{url}/health", tmp / "server.log", env=env, ready=lambda body: body.strip() == b"OK"):
        yield url, tmp / "artifacts"


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory, ray_session):
    url, _ = server
    tmp = tmp_path_factory.mktemp("server_sweep")
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "experiment": EXPERIMENT,
                "storage": str(tmp / "results"),
                "tracking_uri": url,
                "datasets": [{"name": "digits", "subsample": 240, "test_subsample": 120}],
                "annotators": [{"kind": "synthetic", "name": "flip"}],
                "grid": {"q": [0.3], "eta": [0.3], "seeds": [0]},
                "training": {"epochs": EPOCHS, "batch_size": 32, "backbone": "small_cnn"},
                "methods": [{"name": "coreg", "params": {"warmup_epochs": 1, "queue_size": 64}}, {"name": "cc"}],
                "resources": {"cpus_per_trial": 1},
            }
        )
    )
    grid = load_grid(grid_file)
    assert grid.artifact_location is None  # the server decides where artifacts go
    return grid, run(grid, grid_file)


def test_sweep_lands_on_the_server_with_statuses_and_artifacts(server, sweep, tmp_path):
    url, artifact_dir = server
    grid, summary = sweep
    assert summary["failed"] == 0
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.get_run(summary["parent_run_id"])
    assert (parent.data.tags["kind"], parent.info.status) == ("sweep", "FINISHED")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server, not a client path
    assert "grid_resolved.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    kinds = sorted(r.data.tags["kind"] for r in children)
    assert kinds == ["annotation", "trial", "trial"]  # coreg and cc (two methods: the compare view)
    assert all(r.info.status == "FINISHED" for r in children)
    (annotation,) = [r for r in children if r.data.tags["kind"] == "annotation"]
    assert "annotation.json" in [a.path for a in client.list_artifacts(annotation.info.run_id)]

    (trial,) = [r for r in children if r.data.tags["kind"] == "trial" and r.data.tags["method"] == "coreg"]
    assert "artifacts_error" not in trial.data.tags
    assert len(client.get_metric_history(trial.info.run_id, "test/acc")) == EPOCHS
    top = {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {"resolved_config.json", "plots", "student"} <= top
    plots = {Path(a.path).name for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"learning_curves.png", "clean_split.png", "confusion_matrix.png"}
    assert "MLmodel" in {Path(a.path).name for a in client.list_artifacts(trial.info.run_id, "student")}
    # the files went over HTTP into the server's artifact store
    assert list(artifact_dir.rglob("plots/confusion_matrix.png")) and list(artifact_dir.rglob("student/MLmodel"))

    # the student, downloaded from the server, predicts the test set as well as the trial reported
    local = client.download_artifacts(trial.info.run_id, "student", str(tmp_path))
    model = mlflow.pyfunc.load_model(local)
    from trainables.spec import TrialSpec
    from orchestrator.student import driver_dataset

    config_file = client.download_artifacts(trial.info.run_id, "resolved_config.json", str(tmp_path))
    dataset = driver_dataset(TrialSpec.from_config(json.loads(Path(config_file).read_text())))
    acc = (model.predict(dataset.test_x)["class_id"].to_numpy() == dataset.test_y).mean()
    assert acc == pytest.approx(trial.data.metrics["test/acc"], abs=1e-6)


def test_the_mlflow_ui_shows_the_sweep_in_a_real_browser(server, sweep, tmp_path):
    url, _ = server
    shot = Path(os.environ.get("MLFLOW_UI_SCREENSHOT", tmp_path / "mlflow_ui.png"))
    done = subprocess.run(
        [sys.executable, str(UI_CHECK), url, EXPERIMENT, "--screenshot", str(shot), "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode == 2 and "no Chromium found" in done.stderr:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # parent, nested runs, parent artifacts, trial artifacts, results view, parent charts, compare view
    assert done.stdout.count("ok: ") == 7, done.stdout
    shots = [shot] + [shot.with_name(f"{shot.stem}_{s}.png") for s in ("artifacts", "trial", "results", "charts", "compare")]
    for path in shots:
        image = imread(path)
        assert image.shape[:2] == (900, 1400)
        assert np.asarray(image).std() > 0.05  # a rendered page, not a blank one
