"""A disk that fills up mid-sweep: the sweep stops with one message and exit code 1, nothing
unfinished is recorded as done (an Optuna trial is COMPLETE only if its MLflow run is FINISHED),
and the same command run again once space is freed finishes every trial, each exactly once.

No disk is filled: the write errors are injected where they happen. On the driver, sqlite (MLflow's
and Optuna's store) answers every write with "database or disk is full" from the moment the first
trial's run is ended; on a worker, ``torch.save`` of a trial's checkpoint raises ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_grid
from orchestrator.sweep import main, run
from orchestrator.tracking import Tracker

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

EPOCHS = 4
SEEDS = [0, 1]


def write_grid(tmp: Path, experiment: str) -> Path:
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "experiment": experiment,
                "storage": str(tmp / "results"),
                "datasets": [{"name": "digits", "subsample": 400, "test_subsample": 100}],
                "annotators": [{"kind": "synthetic"}],
                "grid": {"q": [0.3], "eta": [0.3], "seeds": SEEDS},
                "training": {"epochs": EPOCHS, "batch_size": 64, "backbone": "small_cnn"},
                "methods": [{"name": "cc"}],
                "max_retries": 1,
                "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
            }
        )
    )
    return grid_file


@contextlib.contextmanager
def sqlite_full_from_first_finished_trial(monkeypatch):
    """Every sqlite write (MLflow's and Optuna's stores) fails as on a full disk, from the moment
    the driver ends the first trial's run FINISHED until the block is left (space freed)."""
    full = [False]

    def refuse(conn, cursor, statement, parameters, context, executemany):
        if full[0] and statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlalchemy.exc.OperationalError(statement, parameters, sqlite3.OperationalError("database or disk is full"))

    real_end_run = Tracker.end_run

    def end_run(self, run_id, status="FINISHED"):
        if status == "FINISHED" and self.client.get_run(run_id).data.tags.get("kind") == "trial":
            full[0] = True
        real_end_run(self, run_id, status)

    monkeypatch.setattr(Tracker, "end_run", end_run)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", refuse)
    try:
        yield full
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", refuse)
        monkeypatch.setattr(Tracker, "end_run", real_end_run)


def checkpoint_full_on_seed_1(monkeypatch, marker: Path) -> None:
    """While ``marker`` exists, writing the seed-1 trial's epoch-3 checkpoint raises ENOSPC (every
    attempt: a retry meets the same full disk)."""
    import trainables.loop

    real_train_trial = trainables.loop.train_trial

    def trainable(config):
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if marker.exists() and config["cell"]["seed"] == 1 and isinstance(obj, dict) and obj.get("epoch") == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
        try:
            real_train_trial(config)
        finally:
            torch.save = real_save

    monkeypatch.setattr(trainables.loop, "train_trial", trainable)  # what run_trials launches


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=100)


def optuna_trials(storage_dir: Path) -> dict[tuple[str, int], optuna.trial.TrialState]:
    """Every Optuna trial's state by (the study's id, as in the runs' ``study`` tag; trial number)."""
    storage = f"sqlite:///{storage_dir / 'optuna.db'}"
    return {
        (s.user_attrs.get("study_id", s.study_name), t.number): t.state
        for s in optuna.get_all_study_summaries(storage)
        for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
    }


def assert_nothing_done_that_is_not(client: MlflowClient, experiment: str, storage_dir: Path) -> None:
    """Every Optuna trial counted COMPLETE has a FINISHED MLflow run, and no other."""
    status = {(r.data.tags["study"], int(r.data.tags["optuna_trial"])): r.info.status for r in trial_runs(client, experiment)}
    for key, state in optuna_trials(storage_dir).items():
        if state == optuna.trial.TrialState.COMPLETE:
            assert status.get(key) == "FINISHED", (key, status.get(key))


def assert_finished_exactly_once(summary: dict, client: MlflowClient, experiment: str, storage_dir: Path) -> None:
    assert summary["resumed"] and summary["failed"] == 0 and not summary["interrupted"]
    runs = trial_runs(client, experiment)
    assert sorted(int(r.data.tags["seed"]) for r in runs) == SEEDS  # one run per trial: no duplicate
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags["seed"], r.info.status) for r in runs]
    exp = client.get_experiment_by_name(experiment)
    assert not client.search_runs([exp.experiment_id], "attributes.status != 'FINISHED'")
    for r in runs:  # every epoch logged exactly once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "test/acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.data.tags["seed"], steps)
    states = optuna_trials(storage_dir)
    assert list(states.values()) == [optuna.trial.TrialState.COMPLETE] * len(SEEDS), states
    assert {(r.data.tags["study"], int(r.data.tags["optuna_trial"])) for r in runs} == set(states)
    # The tables hold every seed: no cell shown from one seed of two.
    assert [row["seeds"] for row in summary["rows"]] == [len(SEEDS)], summary["rows"]


def test_a_full_tracking_store_stops_the_sweep_and_the_rerun_finishes_every_trial_once(tmp_path, ray_session, monkeypatch, capsys):
    grid_file = write_grid(tmp_path, "diskfull_driver")
    grid = load_grid(grid_file)
    client = MlflowClient(grid.resolved_tracking_uri)
    with sqlite_full_from_first_finished_trial(monkeypatch) as full:
        code = main([str(grid_file)])
        assert full[0], "the disk never filled: no trial finished"
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "error: a write failed:" in err and "database or disk is full" in err, err[-3000:]
    assert "run the same command again" in err and "Traceback" not in err, err[-3000:]
    assert_nothing_done_that_is_not(client, "diskfull_driver", grid.storage_path)
    assert not any(r.info.status == "FINISHED" for r in trial_runs(client, "diskfull_driver"))

    summary = run(load_grid(grid_file), grid_file)  # space freed: the same command
    assert_finished_exactly_once(summary, client, "diskfull_driver", grid.storage_path)


def test_a_checkpoint_that_cannot_be_written_stops_the_sweep_and_the_rerun_resumes_it(tmp_path, ray_session, monkeypatch, capsys):
    grid_file = write_grid(tmp_path, "diskfull_worker")
    grid = load_grid(grid_file)
    client = MlflowClient(grid.resolved_tracking_uri)
    marker = tmp_path / "disk_full"
    marker.touch()
    checkpoint_full_on_seed_1(monkeypatch, marker)
    code = main([str(grid_file)])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "error: a write failed: OSError: [Errno 28] No space left on device" in err, err[-3000:]
    assert "run the same command again" in err and "Traceback" not in err, err[-3000:]
    assert_nothing_done_that_is_not(client, "diskfull_worker", grid.storage_path)
    (victim,) = [r for r in trial_runs(client, "diskfull_worker") if r.data.tags["seed"] == "1"]
    assert victim.info.status == "KILLED" and "retries" not in victim.data.tags  # stopped, not retried
    assert victim.data.metrics["epoch"] == 2  # the epochs before the failed checkpoint are kept

    marker.unlink()  # space freed: the same command
    summary = run(load_grid(grid_file), grid_file)
    assert_finished_exactly_once(summary, client, "diskfull_worker", grid.storage_path)
    assert client.get_run(victim.info.run_id).data.tags["resumed"] == "1"


def test_write_failures_are_recognised_through_the_wrappers_of_mlflow_optuna_and_ray():
    from mlflow.exceptions import MlflowException

    from orchestrator.faults import WriteError, write_problem

    sqlite_full = sqlalchemy.exc.OperationalError("UPDATE runs", {}, sqlite3.OperationalError("database or disk is full"))
    try:
        raise MlflowException(sqlite_full) from sqlite_full
    except MlflowException as err:
        assert "database or disk is full" in write_problem(err)
    try:
        try:
            raise sqlite_full
        except sqlalchemy.exc.OperationalError as cause:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
    except optuna.exceptions.StorageInternalError as err:
        assert "database or disk is full" in write_problem(err)
    assert write_problem(OSError(errno.EIO, "Input/output error")) == "OSError: [Errno 5] Input/output error"
    trial_traceback = "Traceback (most recent call last):\n  File ...\nOSError: [Errno 28] No space left on device: '/x/state.pt'\n"
    assert write_problem(trial_traceback) == "OSError: [Errno 28] No space left on device: '/x/state.pt'"
    assert write_problem(WriteError("OSError: [Errno 28] No space left on device")) == "OSError: [Errno 28] No space left on device"
    # Not write failures: a bad value, a missing file, a trial's own error.
    assert write_problem(ValueError("lr must be positive")) is None
    assert write_problem(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None
    assert write_problem("RuntimeError: injected failure: cc always") is None
