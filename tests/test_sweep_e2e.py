"""One real sweep of a tiny grid on the shared local Ray, checked through MLflow and Optuna."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_grid
from orchestrator.sweep import run

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

EPOCHS = 3


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("sweep")
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "experiment": "e2e",
                "storage": str(tmp / "results"),
                "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "datasets": [{"name": "digits", "subsample": 240, "test_subsample": 120}],
                "annotators": [{"kind": "synthetic", "name": "flip"}],
                "grid": {"q": [0.3], "eta": [0.3], "seeds": [0]},
                "training": {"epochs": EPOCHS, "batch_size": 32, "backbone": "small_cnn"},
                "methods": [
                    {"name": "coreg", "params": {"warmup_epochs": 1, "queue_size": 64}},
                    {"name": "proden"},
                    {"name": "cc", "search": {"num_samples": 2}},
                ],
                "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
            }
        )
    )
    grid = load_grid(grid_file)
    summary = run(grid, grid_file)
    second = run(grid, grid_file)  # a second sweep reuses the annotation cache
    return grid, summary, second


def runs_of(client: MlflowClient, experiment_id: str, filter_string: str):
    return client.search_runs([experiment_id], filter_string=filter_string, max_results=1000)


def test_sweep_lands_nested_runs_with_metrics_and_tags(sweep):
    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["kind"] == "sweep" and parent.info.status == "FINISHED"
    assert summary["failed"] == 0

    children = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [r for r in children if r.data.tags["kind"] == "trial"]
    annotations = [r for r in children if r.data.tags["kind"] == "annotation"]
    assert len(trials) == 4  # coreg 1 + proden 1 + cc 2
    assert sorted(r.data.tags["method"] for r in trials) == ["cc", "cc", "coreg", "proden"]
    assert len(annotations) == 1
    stats = annotations[0].data.metrics
    assert 0.55 < stats["annotation/partial_acc"] < 0.85  # eta = 0.3 on 180 training images
    assert stats["annotation/eta_realised"] == pytest.approx(1 - stats["annotation/partial_acc"])

    for r in trials:
        assert r.info.status == "FINISHED"
        tags = r.data.tags
        for key in ("method", "dataset", "annotator", "q", "eta", "shots", "fraction", "seed", "signature"):
            assert tags[key], key
        assert (tags["dataset"], tags["annotator"], tags["q"], tags["eta"]) == ("digits", "flip", "0.3", "0.3")
        history = client.get_metric_history(r.info.run_id, "test/acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        for key in ("val/covering_rate", "pl/acc", "train/loss"):
            assert key in r.data.metrics, key
        assert r.data.params["method"] == tags["method"]
        assert r.data.params["training.epochs"] == str(EPOCHS)
        artifacts = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert "resolved_config.json" in artifacts
    coreg = next(r for r in trials if r.data.tags["method"] == "coreg")
    for key in ("test/acc_net_a", "test/acc_net_b", "split/size", "split/precision"):
        assert key in coreg.data.metrics, key
    assert len(client.get_metric_history(coreg.info.run_id, "split/precision")) >= EPOCHS - 1


def test_optuna_studies_hold_one_study_per_cell_and_method(sweep):
    grid, _, _ = sweep
    storage = f"sqlite:///{grid.storage_path / 'optuna.db'}"
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    assert len(studies) == 3
    cc = next(name for name in studies if ".cc." in name)
    trials = optuna.load_study(study_name=cc, storage=storage).trials
    # the second sweep continues the same studies: each study's budget is already spent
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[0].params["lr"] != trials[1].params["lr"]


def test_second_sweep_reuses_the_annotation(sweep):
    grid, summary, second = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    runs = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{second['parent_run_id']}' and tags.kind = 'annotation'")
    assert [r.data.tags["cached"] for r in runs] == ["True"]
    assert not runs_of(client, exp.experiment_id, "attributes.status = 'RUNNING'")
    assert Path(grid.storage_path / "annotations").is_dir()


def test_clip_annotated_sweep_end_to_end(tmp_path, ray_session):
    """The CLIP path through the real entry point: a tiny random open_clip model from a config
    annotates digits on Ray Data, the annotation run carries zero-shot statistics, trials train on
    the union-of-templates candidate sets."""
    tiny = Path(__file__).parent / "fixtures" / "tiny_clip.json"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "experiment": "e2e-clip",
                "storage": str(tmp_path / "results"),
                "datasets": [{"name": "digits", "subsample": 200, "test_subsample": 100}],
                "annotators": [
                    {
                        "kind": "clip",
                        "name": "tiny_clip",
                        "pretrained": None,
                        "model_config_path": str(tiny),
                        "templates": ["a photo of a {}", "a drawing of a {}", "a blurry photo of the {}"],
                        "batch_size": 64,
                    }
                ],
                "grid": {"seeds": [0]},
                "training": {"epochs": 2, "batch_size": 32, "backbone": "small_cnn"},
                "methods": [{"name": "cc"}],
            }
        )
    )
    grid = load_grid(grid_file)
    summary = run(grid, grid_file)
    assert summary["failed"] == 0
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e-clip")
    children = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    (annotation,) = [r for r in children if r.data.tags["kind"] == "annotation"]
    stats = annotation.data.metrics
    for key in ("zs_acc_train", "zs_acc_test", "zs_acc_avg_train", "zs_acc_avg_test", "partial_acc", "mean_set_size"):
        assert f"annotation/{key}" in stats, key
    assert 1.0 <= stats["annotation/mean_set_size"] <= 3.0  # union of 3 templates' answers
    (trial,) = [r for r in children if r.data.tags["kind"] == "trial"]
    assert trial.info.status == "FINISHED"
    assert (trial.data.tags["annotator"], trial.data.tags["q"], trial.data.tags["eta"]) == ("tiny_clip", "", "")
    assert len(client.get_metric_history(trial.info.run_id, "test/acc")) == 2
