"""Never lose work: a killed driver is resumed, and a failing trial is retried from its checkpoint.

The first test starts the real entry point in a subprocess, kills the driver (SIGKILL, then the
Ray processes it started: a lost head node) while a trial is half-way, runs the same grid again
with ``--resume`` semantics and checks MLflow, Optuna and the result directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_grid
from orchestrator.sweep import run

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

EPOCHS = 25


def write_grid(tmp: Path, experiment: str, methods: list[dict], epochs: int, max_retries: int = 1) -> Path:
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "experiment": experiment,
                "storage": str(tmp / "results"),
                "datasets": [{"name": "digits", "subsample": 600, "test_subsample": 200}],
                "annotators": [{"kind": "synthetic"}],
                "grid": {"q": [0.3], "eta": [0.3], "seeds": [0]},
                "training": {"epochs": epochs, "batch_size": 64, "backbone": "small_cnn"},
                "methods": methods,
                "max_retries": max_retries,
                "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
            }
        )
    )
    return grid_file


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=100)


def test_killed_driver_is_resumed_without_losing_or_duplicating_work(tmp_path, ray_session):
    grid_file = write_grid(tmp_path, "resume", [{"name": "cc", "search": {"num_samples": 2}}, {"name": "proden"}], EPOCHS)
    grid = load_grid(grid_file)
    client = MlflowClient(grid.resolved_tracking_uri)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", str(grid_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    victim = None
    try:
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:  # a finished trial and a half-done one
            time.sleep(0.3)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            if client.get_experiment_by_name("resume") is None:
                continue
            runs = trial_runs(client, "resume")
            if not any(r.info.status == "FINISHED" for r in runs):
                continue
            for r in runs:
                epoch = r.data.metrics.get("epoch", 0)
                if r.info.status == "RUNNING" and "checkpoint" in r.data.tags and 3 <= epoch <= EPOCHS - 5:
                    victim = r
        assert victim is not None, "no trial was caught half-way"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the Ray processes the driver started go too
        except ProcessLookupError:
            pass
        log.close()
    time.sleep(1.0)

    # What the killed driver left: runs RUNNING, Optuna trials RUNNING, checkpoints on disk.
    left = {r.info.run_id: r for r in trial_runs(client, "resume")}
    assert left[victim.info.run_id].info.status == "RUNNING"
    annotations = sorted((grid.storage_path / "annotations").iterdir())
    stamps = [p.stat().st_mtime_ns for p in annotations]

    summary = run(grid, grid_file, resume=True)

    assert summary["resumed"] and summary["failed"] == 0 and not summary["interrupted"]
    runs = trial_runs(client, "resume")
    assert len(runs) == 3  # cc x 2 + proden: no duplicate run for the resumed trial
    assert all(r.info.status == "FINISHED" for r in runs)
    exp = client.get_experiment_by_name("resume")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert len(client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")) == 1
    assert len(client.search_runs([exp.experiment_id], "tags.kind = 'annotation'")) == 1
    for r in runs:  # every epoch logged exactly once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "test/acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.data.tags["method"], steps)
    resumed = client.get_run(victim.info.run_id)
    assert resumed.data.tags["resumed"] == "1"

    # The resumed trial continued from its checkpoint: its new Tune trial reported only later epochs.
    again = next(r for r in summary["result_grid"] if r.config.get("mlflow_run_id") == victim.info.run_id)
    checkpoint = left[victim.info.run_id].data.tags["checkpoint"]  # the last one the killed driver saw
    assert again.config["resume_checkpoint"] == checkpoint
    first_epoch = int(again.metrics_dataframe["epoch"].min())
    saved_epoch = torch.load(Path(checkpoint) / "state.pt", weights_only=False)["epoch"]
    assert first_epoch == saved_epoch + 1 and saved_epoch >= 3
    assert len(summary["result_grid"]) == 2  # the resumed trial and the one never started; none rerun

    # Optuna: every study finished its budget; the annotation was read from the cache.
    storage = f"sqlite:///{grid.storage_path / 'optuna.db'}"
    states = [t.state for s in optuna.get_all_study_summaries(storage) for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    assert [p.stat().st_mtime_ns for p in annotations] == stamps


def test_failing_trials_are_retried_from_their_checkpoint_and_do_not_stop_the_sweep(tmp_path, ray_session):
    epochs = 5
    grid_file = write_grid(tmp_path, "retry", [{"name": "proden"}, {"name": "cc"}], epochs, max_retries=1)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()

    def flaky(config):
        """proden fails once at epoch 3; cc fails at epoch 2 on every attempt."""
        from ray import tune

        from trainables.loop import train_trial

        real_report = tune.report

        def report(metrics, checkpoint=None):
            marker = marker_dir / config["method"]
            if config["method"] == "proden" and metrics["epoch"] == 3 and not marker.exists():
                marker.touch()
                raise RuntimeError("injected failure: proden once")
            if config["method"] == "cc" and metrics["epoch"] == 2:
                raise RuntimeError("injected failure: cc always")
            real_report(metrics, checkpoint=checkpoint)

        tune.report = report
        try:
            train_trial(config)
        finally:
            tune.report = real_report

    grid = load_grid(grid_file)
    summary = run(grid, grid_file, trainable=flaky)

    assert summary["failed"] == 1 and not summary["interrupted"]
    client = MlflowClient(grid.resolved_tracking_uri)
    runs = {r.data.tags["method"]: r for r in trial_runs(client, "retry")}
    proden, cc = runs["proden"], runs["cc"]
    assert proden.info.status == "FINISHED" and proden.data.tags["retries"] == "1"
    assert "injected failure: proden once" in proden.data.tags["last_error"]
    steps = [m.step for m in client.get_metric_history(proden.info.run_id, "test/acc")]
    assert sorted(steps) == list(range(1, epochs + 1))  # restarted from epoch 2's checkpoint, not from scratch
    assert cc.info.status == "FAILED" and "injected failure: cc always" in cc.data.tags["error"]
    assert cc.data.tags["retries"] == "1"
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "1"
    assert [r["row"] for r in summary["rows"]] == ["proden"]  # the failed method has no table entry


def test_sigterm_stops_the_driver_like_ctrl_c(tmp_path, ray_session):
    """``kill <pid>`` (a scheduler's preemption, ``ray job stop``): Tune ends its trials, the running
    trial's run and the sweep end KILLED, finished work stays FINISHED, the exit code is 130."""
    grid_file = write_grid(tmp_path, "sigterm", [{"name": "cc", "search": {"num_samples": 2}}], EPOCHS)
    client = MlflowClient(load_grid(grid_file).resolved_tracking_uri)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", str(grid_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        caught = False
        while not caught and time.monotonic() < deadline:  # a finished trial and a running one
            time.sleep(0.3)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            if client.get_experiment_by_name("sigterm") is None:
                continue
            runs = trial_runs(client, "sigterm")
            caught = any(r.info.status == "FINISHED" for r in runs) and any(
                r.info.status == "RUNNING" and r.data.metrics.get("epoch", 0) >= 2 for r in runs
            )
        assert caught, "no trial was caught running"
        os.kill(driver.pid, signal.SIGTERM)
        code = driver.wait(120)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert code == 130, output[-3000:]
    exp = client.get_experiment_by_name("sigterm")
    statuses = sorted(r.info.status for r in trial_runs(client, "sigterm"))
    assert statuses == ["FINISHED", "KILLED"]
    (sweep,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    assert sweep.info.status == "KILLED"
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert "run the same command again to resume them" in output
    # The console holds the project's lines: no library notice or banner, accuracies in %.
    for noise in ("Token authentication", "Started a local Ray instance", "Configuration for experiment",
                  "tensorboard", "Downloading artifacts", "save not implemented", "Creating initial MLflow database"):  # fmt: skip
        assert noise not in output, noise
    assert re.search(r"cc s0 #\d: finished after \d+ epochs \(test/acc=\d+\.\d\d%", output), output[-3000:]

    # ... and the same grid again finishes the stopped trial in its own run, every epoch logged once.
    killed = next(r for r in trial_runs(client, "sigterm") if r.info.status == "KILLED")
    summary = run(load_grid(grid_file), grid_file)
    assert summary["resumed"] and summary["failed"] == 0 and not summary["interrupted"]
    runs = trial_runs(client, "sigterm")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert client.get_run(killed.info.run_id).data.tags["resumed"] == "1"
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "test/acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), steps
