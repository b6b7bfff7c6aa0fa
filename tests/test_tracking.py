"""The driver-side MLflow callback gives every trial a final status, whatever happens to it."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.tracking import MlflowTrialCallback, Tracker, flatten

pytestmark = pytest.mark.ray


def tags_for(config):
    return {"method": "m", "cell": f"fail={config['fail']}"}


def test_failed_and_finished_trials_end_with_their_status(tmp_path, ray_session):
    def trainable(config):  # defined here so that Ray pickles it by value
        for epoch in range(1, 3):
            tune.report({"epoch": epoch, "test/acc": 0.5 + 0.1 * epoch, "train/loss": 1.0 / epoch, "ignored": 1})
        if config["fail"]:
            raise RuntimeError("boom: injected failure")

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", (tmp_path / "art").as_uri())
    parent = tracker.start_run("sweep", {"kind": "sweep"})
    callback = MlflowTrialCallback(tracker, parent, tags_for)
    tuner = tune.Tuner(
        trainable,
        param_space={"fail": tune.grid_search([False, True]), "method": "m", "objective": "val/x"},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
    )
    tuner.fit()
    client = MlflowClient(tracker.uri)
    runs = {r.data.tags["cell"]: r for r in client.search_runs([tracker.experiment_id], "tags.method = 'm'")}
    assert runs["fail=False"].info.status == "FINISHED"
    assert runs["fail=True"].info.status == "FAILED"
    assert "boom: injected failure" in runs["fail=True"].data.tags["error"]
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == parent
        history = client.get_metric_history(run.info.run_id, "test/acc")
        assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.6), (2, 0.7)]
        assert "ignored" not in run.data.metrics
    assert callback.open_runs() == []


def test_interrupted_runs_are_marked_killed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", (tmp_path / "art").as_uri())
    parent = tracker.start_run("sweep", {"kind": "sweep"})
    running = tracker.start_run("trial", {"kind": "trial"}, parent)
    finished = tracker.start_run("trial", {"kind": "trial"}, parent)
    tracker.end_run(finished)
    assert tracker.close_open_runs(parent, "KILLED") == 1
    client = MlflowClient(tracker.uri)
    assert client.get_run(running).info.status == "KILLED"
    assert client.get_run(finished).info.status == "FINISHED"


def test_flatten_makes_dotted_string_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
