"""The driver-side MLflow callback gives every trial a final status, whatever happens to it."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.config import parse_grid
from orchestrator.plan import expand
from orchestrator.search import ListSearcher
from orchestrator.tracking import MlflowTrialCallback, Tracker, flatten

pytestmark = pytest.mark.ray


def trial_specs(methods=("cc",), seeds=(0,), epochs=2) -> list:
    """Real trial specs, one per method and seed."""
    grid = parse_grid({"experiment": "tracking", "datasets": [{"name": "digits"}], "annotators": [{"kind": "synthetic"}],
                       "grid": {"q": [0.3], "eta": [0.1], "seeds": list(seeds)}, "training": {"epochs": epochs},
                       "methods": [{"name": m} for m in methods]})  # fmt: skip
    return [s.trial_config({}, annotation_key="k", cache_dir="/c", cpus=1) for s in expand(grid)]


def test_failed_and_finished_trials_end_with_their_status(tmp_path, ray_session):
    def trainable(config):  # defined here so that Ray pickles it by value
        for epoch in range(1, 3):
            tune.report({"epoch": epoch, "test/acc": 0.5 + 0.1 * epoch, "train/loss": 1.0 / epoch, "ignored": 1})
        if config["cell"]["seed"] == 1:
            raise RuntimeError("boom: injected failure")

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", (tmp_path / "art").as_uri())
    parent = tracker.start_run("sweep", {"kind": "sweep"})
    callback = MlflowTrialCallback(tracker, parent)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ListSearcher(trial_specs(seeds=(0, 1))), num_samples=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
    )
    tuner.fit()
    assert callback.finish() == 0  # the finished trial's learning curves were plotted
    client = MlflowClient(tracker.uri)
    runs = {r.data.tags["seed"]: r for r in client.search_runs([tracker.experiment_id], "tags.method = 'cc'")}
    assert runs["0"].info.status == "FINISHED"
    assert runs["1"].info.status == "FAILED"
    assert "boom: injected failure" in runs["1"].data.tags["error"]
    assert [a.path for a in client.list_artifacts(runs["0"].info.run_id, "plots")] == ["plots/learning_curves.png"]
    for run in runs.values():
        assert run.data.tags["mlflow.parentRunId"] == parent
        history = client.get_metric_history(run.info.run_id, "test/acc")
        assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.6), (2, 0.7)]
        assert "ignored" not in run.data.metrics
    assert callback.open_runs() == []


def test_a_retried_trial_logs_the_epochs_it_repeats_after_its_checkpoint_once(tmp_path):
    """A node lost after a trial's epoch-4 result was logged but before its epoch-4 checkpoint was
    registered: Tune restores epoch 3's checkpoint and epoch 4 comes again; it is logged once."""
    from types import SimpleNamespace

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking", (tmp_path / "art").as_uri())
    callback = MlflowTrialCallback(tracker, tracker.start_run("sweep", {"kind": "sweep"}))
    trial = SimpleNamespace(trial_id="t0", config=trial_specs(epochs=5)[0].to_config(), last_result={}, error_file=None,
                            error_msg="The actor died because its node has died.")  # fmt: skip
    for epoch in (1, 2, 3, 4):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "test/acc": 0.1 * epoch})
    callback.on_trial_recover(0, [], trial)
    for epoch in (4, 5):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "test/acc": 0.1 * epoch})
    history = MlflowClient(tracker.uri).get_metric_history(callback.runs["t0"], "test/acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in callback.history["t0"]] == [1, 2, 3, 4, 5]  # the learning curves' points


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


def test_console_progress_counts_and_reports_running_epochs(capsys):
    from types import SimpleNamespace

    from orchestrator.tracking import ConsoleProgress

    configs = {s.method: s.to_config() for s in trial_specs(methods=("coreg", "cc"), epochs=30)}

    def trial(tid, method):
        return SimpleNamespace(trial_id=tid, config=configs[method], last_result={}, error_file=None)

    progress = ConsoleProgress(total=3, label_for=lambda spec: spec.method, every_s=0.0)
    a, b = trial("a", "coreg"), trial("b", "cc")
    progress.on_trial_start(0, [], a)
    progress.on_trial_result(0, [], a, {"epoch": 4})
    progress.on_trial_result(0, [], b, {"epoch": 2})  # reused actor: a result before any start event
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "[trials 0 done, 0 failed, 2 running, 1 pending] running: coreg epoch 4/30; cc epoch 2/30"
    a.last_result = {"epoch": 30, "test/acc": 0.9, "val/covering_rate": 0.8}
    progress.on_trial_complete(0, [], a)
    out = capsys.readouterr().out.splitlines()
    assert out == ["[trials 1 done, 0 failed, 1 running, 1 pending] coreg: finished after 30 epochs "
                   "(test/acc=90.00%, val/covering_rate=80.00%)"]
    quiet = ConsoleProgress(total=1, label_for=lambda spec: spec.method, every_s=3600.0)
    quiet.on_trial_result(0, [], a, {"epoch": 1})
    assert capsys.readouterr().out == ""


def test_the_sweep_run_records_its_storage_as_an_absolute_path(tmp_path, monkeypatch):
    """A rerun reads the grid back from the sweep run, possibly from another directory (a Ray job's
    working directory): a relative storage must not be resolved again there."""
    import json
    from pathlib import Path

    from orchestrator.config import parse_grid
    from trainables.data.spec import signature
    from orchestrator.sweep import open_sweep_run

    monkeypatch.chdir(tmp_path)
    grid = parse_grid({"experiment": "abs", "storage": "./results", "datasets": [{"name": "digits"}],
                       "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.1]},
                       "methods": [{"name": "cc"}]})
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "abs", (tmp_path / "art").as_uri())
    parent, resumed = open_sweep_run(tracker, grid, None, signature(grid.model_dump()), resume=False)
    stored = json.loads(Path(tracker.client.download_artifacts(parent, "grid_resolved.json", str(tmp_path))).read_text())
    assert not resumed and stored["storage"] == str(tmp_path / "results")
    assert parse_grid(stored).storage_path == tmp_path / "results"


def test_a_resolved_config_of_an_earlier_version_reads_back_with_its_signature():
    """``resolved_config.json`` as earlier drivers wrote it (a plain dict, ``signature`` included;
    the oldest without ``label``): reruns and students read it as a TrialSpec."""
    from trainables.spec import TrialSpec

    spec = trial_specs()[0].replace(optuna_trial=3)
    old = {k: v for k, v in spec.to_config().items() if v is not None and k not in ("label", "device")}
    read = TrialSpec.from_config(old)
    assert read == spec and read.signature == spec.signature == old["signature"]


def test_run_names_are_short_and_name_only_the_cell_axes_that_vary():
    from orchestrator import runs

    grid = parse_grid({"experiment": "names", "datasets": [{"name": "digits"}], "annotators": [{"kind": "synthetic", "name": "flip"}],
                       "grid": {"q": [0.1, 0.3], "eta": [0.2], "seeds": [0, 1]},
                       "methods": [{"name": "coreg"}, {"name": "cc", "search": {"num_samples": 2}}]})  # fmt: skip
    studies = expand(grid)
    specs = [s.trial_config({}, annotation_key="k", cache_dir="/c", cpus=1, optuna_trial=1) for s in studies]
    several = frozenset(s.study_id for s in studies if s.method.search.num_samples > 1)
    names = runs.RunNames(runs.varying_axes(s.cell for s in specs), several)
    assert names.varying == ("q",)  # one data set, annotator and eta: not in the names; the seed always is
    assert sorted(names(s) for s in specs) == [
        "cc q=0.1 s0 #1", "cc q=0.1 s1 #1", "cc q=0.3 s0 #1", "cc q=0.3 s1 #1",
        "coreg q=0.1 s0", "coreg q=0.1 s1", "coreg q=0.3 s0", "coreg q=0.3 s1",
    ]  # fmt: skip
    rerun = specs[0].replace(variant="no_prototypes", rerun_of="abc")
    assert names(rerun).startswith("coreg [no_prototypes] q=0.1")
    assert max(len(names(s)) for s in specs) <= 20  # fits MLflow's run-name column


def test_system_tags_name_the_user_entry_point_and_the_commit_of_the_project():
    import subprocess

    from orchestrator import runs

    tags = runs.system_tags("orchestrator.rerun")
    assert tags["mlflow.source.name"] == "orchestrator.rerun" and tags["mlflow.user"]
    assert tags["mlflow.project.entryPoint"] == "python -m orchestrator.rerun"
    head = subprocess.run(["git", "-C", str(runs.PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (an installed package has no commit tag)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["mlflow.source.git.dirty"] in ("true", "false")


def test_summary_metric_names_are_valid_mlflow_names(tmp_path):
    from orchestrator import runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    keys = [runs.summary_metric("q=0.3 eta=0.1", "coreg [no_prototypes]", "acc_selected_mean"),
            runs.summary_metric("cifar10 clip", "cc [training.lr=0.01]", "objective_std")]  # fmt: skip
    assert keys == ["q_0.3 eta_0.1/coreg no_prototypes/acc_selected_mean", "cifar10 clip/cc training.lr_0.01/objective_std"]
    for key in keys:
        client.log_metric(run_id, key, 0.5)  # refused by MLflow if a character were not allowed
    assert set(client.get_run(run_id).data.metrics) == set(keys)


def test_the_mlflow_tag_names_spelled_out_in_the_run_layout_are_mlflow_s():
    from mlflow.utils import mlflow_tags

    from orchestrator import runs

    for name in ("MLFLOW_PARENT_RUN_ID", "MLFLOW_RUN_NAME", "MLFLOW_USER", "MLFLOW_SOURCE_NAME", "MLFLOW_SOURCE_TYPE",
                 "MLFLOW_GIT_COMMIT", "MLFLOW_GIT_DIRTY", "MLFLOW_PROJECT_ENTRY_POINT"):  # fmt: skip
        assert getattr(runs, name) == getattr(mlflow_tags, name), name
