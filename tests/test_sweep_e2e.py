"""One real sweep of a tiny grid on the shared local Ray, checked through MLflow and Optuna."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_grid
from orchestrator.sweep import run
from trainables.common.diagnostics import collapse_reason

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
                    {"name": "coreg", "params": {"warmup_epochs": 1, "warmup_steps": 0, "queue_size": 64}},
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


def _sweep_once(tmp_path: Path, grid: dict) -> tuple[dict, MlflowClient, list]:
    """Write ``grid`` to a file, sweep it through the real entry point (no trial may fail), and
    return the summary, a client of its tracking store and the sweep's nested runs."""
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    loaded = load_grid(grid_file)
    summary = run(loaded, grid_file)
    assert summary["failed"] == 0
    client = MlflowClient(loaded.resolved_tracking_uri)
    exp = client.get_experiment_by_name(grid["experiment"])
    children = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    return summary, client, children


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
        for key in ("val/covering_rate", "pl/acc", "train/loss", "diag/prediction_entropy", "diag/collapsed"):
            assert key in r.data.metrics, key
        # the label-free collapse tag is read from the last epoch's diagnostics
        assert tags["collapse"] == collapse_reason({k: v for k, v in r.data.metrics.items() if k.startswith("diag/")})
        assert r.data.params["method"] == tags["method"]
        assert r.data.params["training.epochs"] == str(EPOCHS)
        artifacts = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert "resolved_config.json" in artifacts
        assert "artifacts_error" not in tags, tags.get("artifacts_error")
        assert "plots/learning_curves.png" in [a.path for a in client.list_artifacts(r.info.run_id, "plots")]
        assert "student/MLmodel" in [a.path for a in client.list_artifacts(r.info.run_id, "student")]
    coreg = next(r for r in trials if r.data.tags["method"] == "coreg")
    for key in ("test/acc_net_a", "test/acc_net_b", "split/size", "split/precision", "diag/embedding_cosine_a", "diag/key_query_distance_b"):
        assert key in coreg.data.metrics, key
    assert len(client.get_metric_history(coreg.info.run_id, "split/precision")) >= EPOCHS - 1


def test_optuna_studies_hold_one_study_per_cell_and_method(sweep):
    grid, _, _ = sweep
    storage = f"sqlite:///{grid.storage_path / 'optuna.db'}"
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    assert len(studies) == 3
    cc = next(name for name in studies if " | cc | " in name)  # experiment | method | cell
    trials = optuna.load_study(study_name=cc, storage=storage).trials
    # the second sweep continues the same studies: each study's budget is already spent
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[0].params["lr"] != trials[1].params["lr"]


def test_running_the_same_grid_again_adds_no_runs_and_reuses_the_annotation(sweep):
    grid, summary, second = sweep
    assert second["resumed"] and second["parent_run_id"] == summary["parent_run_id"]
    assert second["results"] == []  # every study's budget was spent: nothing ran again
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    assert len(runs_of(client, exp.experiment_id, "tags.kind = 'sweep'")) == 1
    children = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert sorted(r.data.tags["kind"] for r in children) == ["annotation"] + ["trial"] * 4
    assert not runs_of(client, exp.experiment_id, "attributes.status = 'RUNNING'")
    assert Path(grid.storage_path / "annotations").is_dir()


def test_parent_run_carries_the_results_tables_and_best_runs_are_tagged(sweep):
    grid, summary, second = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    parent = summary["parent_run_id"]
    listed = {a.path for a in client.list_artifacts(parent, "tables")}
    assert {"tables/results.md", "tables/results.csv", "tables/results.html", "tables/annotations.csv"} <= listed
    rows = {r["row"]: r for r in summary["rows"]}
    assert set(rows) == {"cc", "coreg", "proden"}
    exp = client.get_experiment_by_name("e2e")
    trials = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.kind = 'trial'")
    cc = [r for r in trials if r.data.tags["method"] == "cc"]
    best = [r for r in cc if r.data.tags["best_in_cell"] == "true"]
    assert len(best) == 1 and [r.data.tags["best_in_cell"] for r in cc].count("false") == 1
    # the best cc trial is the one with the higher label-free objective, and the table shows its accuracy
    assert best[0].data.metrics["val/covering_rate"] == max(r.data.metrics["val/covering_rate"] for r in cc)
    assert rows["cc"]["test_acc_mean"] == pytest.approx(best[0].data.metrics["test/acc"])
    assert rows["cc"]["best_runs"] == f"seed0:{best[0].info.run_id}"
    text = Path(client.download_artifacts(parent, "tables/results.md")).read_text()
    assert "| cc |" in text and "partial acc %" in text
    for r in trials:  # every trial run's description holds the command that reruns it
        assert f"python -m orchestrator.rerun {r.info.run_id}" in r.data.tags["mlflow.note.content"]
    coreg = next(r for r in trials if r.data.tags["method"] == "coreg")
    assert "--ablation no_prototypes" in coreg.data.tags["mlflow.note.content"]


def test_runs_have_short_names_system_tags_and_the_cell_winner_is_tagged(sweep):
    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    trials = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}' and tags.kind = 'trial'")
    # one cell: no cell axis in the names; cc samples two trials, numbered by their Optuna trial
    assert sorted(r.info.run_name for r in trials) == ["cc s0 #0", "cc s0 #1", "coreg s0", "proden s0"]
    parent = client.get_run(summary["parent_run_id"])
    for r in [*trials, parent]:
        assert r.data.tags["mlflow.source.name"] == "orchestrator.sweep" and r.data.tags["mlflow.user"]
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
    # the winner of the cell: the row with the best mean selected accuracy, its chosen run only
    rows = {r["row"]: r for r in summary["rows"]}
    best_row = max(rows, key=lambda k: rows[k]["selected_acc_mean"])
    winners = [r for r in trials if r.data.tags["cell_winner"] == "true"]
    assert [r.info.run_id for r in winners] == [rows[best_row]["best_runs"].split(":")[1]]
    assert all(r.data.tags["best_in_cell"] == "true" for r in winners)
    assert sum(r.data.tags["best_in_cell"] == "true" for r in trials) == 3  # one per study
    # the annotation the trials trained on is their mlflow.data input; the student a logged model of the run
    (annotation,) = runs_of(client, exp.experiment_id, "tags.kind = 'annotation'")
    for r in trials:
        (used,) = r.inputs.dataset_inputs
        assert used.dataset.name == "digits flip q=0.3 eta=0.3 seed=0"
        assert annotation.data.tags["annotation_key"].startswith(used.dataset.digest)
        assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "train")]
        assert int(r.data.tags["student_kb"]) > 0
        models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
        assert [m.name for m in models] == [f"{r.data.tags['method']}-student"]


def test_the_parent_run_holds_summary_metrics_a_results_table_and_the_run_list_view(sweep, monkeypatch):
    import json

    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    parent = summary["parent_run_id"]
    metrics = client.get_run(parent).data.metrics
    for row in summary["rows"]:
        assert metrics[f"digits/{row['row']}/acc_selected_mean"] == pytest.approx(row["selected_acc_mean"])
        assert metrics[f"digits/{row['row']}/objective_mean"] == pytest.approx(row["objective_mean"])
        assert metrics[f"digits/{row['row']}/acc_selected_std"] == 0.0  # one seed
    # search_runs queries the results on the sweep run
    found = runs_of(client, exp.experiment_id, "tags.kind = 'sweep' and metrics.`digits/coreg/acc_selected_mean` > 0")
    assert [r.info.run_id for r in found] == [parent]
    # the table is logged once even though the second sweep published again (replaced, not appended)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", grid.resolved_tracking_uri)  # load_table searches the default store
    table = client.load_table(exp.experiment_id, "tables/results.json", run_ids=[parent])
    assert sorted(table["row"]) == ["cc", "coreg", "proden"]
    # the experiment's saved run-list view: trial runs, with the result columns
    view = json.loads(exp.tags["mlflow.sharedViewState.results"])
    assert view["searchFilter"] == "tags.kind = 'trial'"
    assert {"metrics.`test/acc_selected`", "metrics.`val/covering_rate`", "tags.`cell_winner`"} <= set(view["selectedColumns"])


def test_clip_annotated_sweep_end_to_end(tmp_path, ray_session):
    """The CLIP path through the real entry point: a tiny random open_clip model from a config
    annotates digits on Ray Data, the annotation run carries zero-shot statistics, trials train on
    the union-of-templates candidate sets."""
    tiny = Path(__file__).parent / "fixtures" / "tiny_clip.json"
    summary, client, children = _sweep_once(
        tmp_path,
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
        },
    )
    (annotation,) = [r for r in children if r.data.tags["kind"] == "annotation"]
    stats = annotation.data.metrics
    for key in ("zs_acc_train", "zs_acc_test", "zs_acc_avg_train", "zs_acc_avg_test", "partial_acc", "mean_set_size"):
        assert f"annotation/{key}" in stats, key
    assert 1.0 <= stats["annotation/mean_set_size"] <= 3.0  # union of 3 templates' answers
    (trial,) = [r for r in children if r.data.tags["kind"] == "trial"]
    assert trial.info.status == "FINISHED"
    assert (trial.data.tags["annotator"], trial.data.tags["q"], trial.data.tags["eta"]) == ("tiny_clip", "", "")
    assert len(client.get_metric_history(trial.info.run_id, "test/acc")) == 2
    # the annotator's zero-shot accuracy is a row of the published table, from the annotation run
    table = Path(client.download_artifacts(summary["parent_run_id"], "tables/results.md")).read_text()
    zero_shot = f"{100 * stats['annotation/zs_acc_test']:.2f}"
    assert any(line.startswith("| zero-shot |") and zero_shot in line for line in table.splitlines()), table


def test_clip_students_sweep_end_to_end(tmp_path, ray_session):
    """CoOp and CC on the clip_peft backbone through the real entry point: both learn on the tiny
    CLIP that annotated the cell (read back from the annotation cache inside the trial), CoOp from
    the 2 revealed shots per class; each finished trial logs its deployable student with its size."""
    tiny = Path(__file__).parent / "fixtures" / "tiny_clip.json"
    summary, client, children = _sweep_once(
        tmp_path,
        {
            "experiment": "e2e-clip-students",
            "storage": str(tmp_path / "results"),
            "datasets": [{"name": "digits", "subsample": 160, "test_subsample": 60}],
            "annotators": [
                {"kind": "clip", "name": "tiny_clip", "pretrained": None, "model_config_path": str(tiny),
                 "templates": ["a photo of a {}", "a drawing of a {}"], "batch_size": 64}
            ],  # fmt: skip
            "grid": {"shots": [2], "seeds": [0]},
            "training": {"epochs": 2, "batch_size": 32, "backbone": "small_cnn"},
            "methods": [
                {"name": "coop", "params": {"n_ctx": 4}},
                {"name": "cc", "label": "partialclip_cc", "training": {"backbone": "clip_peft", "peft": "lora", "lora_rank": 4}},
            ],
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        },
    )
    trials = [r for r in children if r.data.tags["kind"] == "trial"]
    assert sorted(r.data.tags["label"] for r in trials) == ["coop", "partialclip_cc"]
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.tags["annotator"] == "tiny_clip"
        assert len(client.get_metric_history(trial.info.run_id, "test/acc")) == 2
        assert int(trial.data.tags["student_kb"]) > 0
    (coop,) = [r for r in trials if r.data.tags["label"] == "coop"]
    assert coop.data.metrics["split/size"] == 20.0  # CoOp's "clean" samples: the 2 shots of 10 classes
    table = Path(client.download_artifacts(summary["parent_run_id"], "tables/results.md")).read_text()
    for row in ("coop", "partialclip_cc", "zero-shot"):
        assert any(line.startswith(f"| {row} |") for line in table.splitlines()), table


def test_vlm_annotated_sweep_end_to_end(tmp_path, ray_session, tiny_vlm_dir):
    """An image-text-to-text annotator through the real entry point: a tiny random LLaVA (local
    directory) scores every class name on Ray Data; Co-Reg trains on the candidate sets and the 2
    revealed shots per class, KD on the probabilities, vlm_lora fine-tunes the annotator itself on
    the shots (loaded back from the annotation cache inside the trial) and logs its merged student,
    and the zero-shot rows come from the annotation run."""
    summary, client, children = _sweep_once(
        tmp_path,
        {
            "experiment": "e2e-vlm",
            "storage": str(tmp_path / "results"),
            "datasets": [{"name": "digits", "subsample": 160, "test_subsample": 60}],
            "annotators": [
                {
                    "kind": "vlm",
                    "name": "tiny_llava",
                    "model": str(tiny_vlm_dir),
                    "templates": ["Which is it: {classes}? Answer:", "Pick one:\n{options}\nAnswer with the letter."],
                    "answer_mode": "score",
                    "batch_size": 32,
                }
            ],
            "grid": {"shots": [2], "seeds": [0]},
            "training": {"epochs": 2, "batch_size": 32, "backbone": "small_cnn"},
            "methods": [
                {"name": "coreg", "params": {"warmup_epochs": 1, "queue_size": 64}},
                {"name": "kd"},
                {"name": "vlm_lora", "params": {"rank": 8, "alpha": 16.0, "eval_batch_size": 32}},
            ],
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        },
    )
    (annotation,) = [r for r in children if r.data.tags["kind"] == "annotation"]
    assert annotation.data.params["annotator.kind"] == "vlm"
    stats = annotation.data.metrics
    for key in ("zs_acc_test", "zs_acc_avg_test", "partial_acc", "mean_set_size"):
        assert f"annotation/{key}" in stats, key
    assert 1.0 <= stats["annotation/mean_set_size"] <= 2.0  # union of 2 templates' argmax
    trials = [r for r in children if r.data.tags["kind"] == "trial"]
    assert sorted(r.data.tags["method"] for r in trials) == ["coreg", "kd", "vlm_lora"]
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.tags["annotator"] == "tiny_llava"
        assert len(client.get_metric_history(trial.info.run_id, "test/acc")) == 2
        assert int(trial.data.tags["student_kb"]) > 0
    (lora,) = [r for r in trials if r.data.tags["method"] == "vlm_lora"]
    assert lora.data.metrics["split/size"] == 20.0  # its "clean" samples: the 2 shots of 10 classes
    table = Path(client.download_artifacts(summary["parent_run_id"], "tables/results.md")).read_text()
    lines = table.splitlines()
    for row, metric in (("zero-shot", "zs_acc_test"), ("zero-shot*", "zs_acc_avg_test")):
        value = f"{100 * stats[f'annotation/{metric}']:.2f}"
        assert any(line.startswith(f"| {row} |") and value in line for line in lines), table
    for method in ("coreg", "kd", "vlm_lora"):
        assert any(line.startswith(f"| {method} |") for line in lines), table


def test_generating_vlm_sweep_logs_unparseable_rates_and_raw_answers(tmp_path, ray_session, tiny_vlm_dir):
    """Generate mode through the real entry point: per-template unparseable rates as metrics of the
    annotation run, the raw answers in its annotation.json, the unparseable column in the tables."""
    summary, client, children = _sweep_once(
        tmp_path,
        {
            "experiment": "e2e-vlm-generate",
            "storage": str(tmp_path / "results"),
            "datasets": [{"name": "digits", "subsample": 100, "test_subsample": 40}],
            "annotators": [{"kind": "vlm", "name": "tiny_llava", "model": str(tiny_vlm_dir), "templates": "lettered",
                            "max_new_tokens": 3, "batch_size": 32}],  # fmt: skip
            "grid": {"seeds": [0]},
            "training": {"epochs": 1, "batch_size": 32, "backbone": "small_cnn"},
            "methods": [{"name": "cc"}],
        },
    )
    (annotation,) = [r for r in children if r.data.tags["kind"] == "annotation"]
    stats = annotation.data.metrics
    rates = [stats[f"annotation/unparseable_rate_t{t}"] for t in range(2)]
    assert stats["annotation/unparseable_rate"] == pytest.approx(sum(rates) / 2)
    record = json.loads(Path(client.download_artifacts(annotation.info.run_id, "annotation.json")).read_text())
    raw = record["meta"]["raw_answers"]
    assert {r["template"] for r in raw} == {0, 1} and all(isinstance(r["answer"], str) for r in raw)
    table = Path(client.download_artifacts(summary["parent_run_id"], "tables/results.md")).read_text()
    assert "unparseable %" in table and f"{100 * stats['annotation/unparseable_rate']:.2f}" in table


def test_rerun_runs_an_ablation_on_more_seeds_nested_under_the_sweep(sweep, capsys):
    from orchestrator.rerun import main as rerun_main

    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    parent = summary["parent_run_id"]
    coreg = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.method = 'coreg'")[0]
    uri = grid.resolved_tracking_uri

    assert rerun_main([coreg.info.run_id, "--tracking-uri", uri, "--ablation", "no_such_thing"]) == 2
    err = capsys.readouterr().err
    assert "no_such_thing" in err and "no_prototypes" in err and "no_co_pseudo_label" in err
    assert rerun_main([coreg.info.run_id, "--tracking-uri", uri, "--set", "params.nope=1"]) == 2
    assert "--set.params.nope: unknown parameter of coreg" in capsys.readouterr().err

    code = rerun_main([coreg.info.run_id, "--tracking-uri", uri, "--ablation", "no_prototypes", "--seeds", "0", "1"])
    assert code == 0
    reruns = runs_of(client, exp.experiment_id, f"tags.rerun_of = '{coreg.info.run_id}'")
    assert len(reruns) == 2
    for r in reruns:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["variant"] == "no_prototypes"
        assert r.data.params["params.prototypes"] == "False" and r.data.params["params.warmup_epochs"] == "1"
    assert sorted(r.data.tags["seed"] for r in reruns) == ["0", "1"]
    csv_text = Path(client.download_artifacts(parent, "tables/results.csv")).read_text()
    line = next(l for l in csv_text.splitlines() if l.startswith("coreg [no_prototypes],"))
    assert ",2," in line  # two seeds in the ablation's row
    assert "| coreg |" in Path(client.download_artifacts(parent, "tables/results.md")).read_text()


def _chromium():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import mlflow_ui_check

    return mlflow_ui_check


@pytest.fixture(scope="module")
def ray_head(ray_session, tmp_path_factory):
    """A second local Ray cluster started like a cluster's head node (``ray start --head``, with its
    dashboard and job API, token authentication as this session has it); stopped at the end."""
    import shutil
    import sys
    import tempfile

    from servers import env_with_venv_bin, free_port, serving

    pytest.importorskip("aiohttp_cors", reason="the Ray dashboard needs ray[default]")
    # Free ports for everything with a fixed default, which this session's own Ray may hold.
    gcs, dashboard, agent, client = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    with serving(cmd, f"{address}/api/version", log, env=env_with_venv_bin()):  # the jobs' `python`
        yield address  # SIGTERM to `ray start --block` stops the Ray processes it started
    shutil.rmtree(temp_dir, ignore_errors=True)


def _launch_from_the_browser(sweep, tmp_path, launcher, ablation: str, seeds: str = "", overrides: str = ""):
    """Open the rerun page in headless Chromium, fill in ``seeds`` and ``overrides`` and click
    ``ablation`` on the Co-Reg trial, check the confirmation page and launch, follow the jobs page
    until the rerun ends; returns (its status, the jobs page text, the runs it made)."""
    import asyncio
    import json
    import threading
    import time
    import urllib.request

    import aiohttp

    from orchestrator.webui import App, make_server

    ui = _chromium()
    binary = ui.find_chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    parent = summary["parent_run_id"]
    proden = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.method = 'proden'")[0]
    coreg = next(
        r for r in runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.method = 'coreg'")
        if "rerun_of" not in r.data.tags
    )
    server = make_server(App(grid.resolved_tracking_uri, launcher))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    async def drive(port: int) -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = ui.Page(ws)
            await page.open(base + "/")
            assert not await page.wait_for_text(["e2e", "FINISHED"], 30)
            await page.evaluate("document.querySelector('a[href^=\"/sweep/\"]').click()")
            assert not await page.wait_for_text(["Trial runs", "Test accuracy", proden.data.tags["cell"], launcher.kind], 30)
            row = f"tr[data-run=\"{coreg.info.run_id}\"]"
            buttons = await page.evaluate(f"document.querySelectorAll('{row} button').length")
            assert buttons == 1 + 5  # rerun + Co-Reg's five ablations
            # each run links to its MLflow page; only the cell winner's runs are highlighted
            link = await page.evaluate(f"document.querySelector('{row} a').href")
            assert link.endswith(f"/#/experiments/{exp.experiment_id}/runs/{coreg.info.run_id}")
            highlighted = await page.evaluate("[...document.querySelectorAll('tr.best')].map(r => r.dataset.run)")
            winners = runs_of(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.cell_winner = 'true'")
            assert sorted(highlighted) == sorted(r.info.run_id for r in winners) and len(highlighted) >= 1
            shot = Path(os.environ.get("RERUN_PAGE_SCREENSHOT", tmp_path / "rerun_page.png"))
            await page.evaluate(f"document.querySelector('{row}').scrollIntoView()")
            await page.screenshot(shot)
            fill = f"document.querySelector('{row} input[name=seeds]').value = {json.dumps(seeds)}; "
            fill += f"document.querySelector('{row} input[name=overrides]').value = {json.dumps(overrides)};"
            await page.evaluate(fill)
            await page.evaluate(f"document.querySelector('{row} button[data-ablation=\"{ablation}\"]').click()")
            expected = [f"--ablation {ablation}"] + ([f"--seeds {seeds}"] if seeds else []) + ([f"--set {overrides}"] if overrides else [])
            missing = await page.wait_for_text(["Confirm the rerun", *expected], 30)
            assert not missing, await page.evaluate("document.body.innerText")
            assert launcher.jobs() == []  # nothing runs before the confirmation
            await page.evaluate("document.querySelector('#confirm').click()")
            missing = await page.wait_for_text(["Launched reruns", f"--ablation {ablation}"], 30)
            assert not missing, await page.evaluate("document.body.innerText")
            deadline = time.monotonic() + 240
            status = ""
            while time.monotonic() < deadline:
                status = await page.evaluate("(document.querySelector('td.status') || {}).innerText || ''")
                if status not in ("PENDING", "RUNNING"):
                    break
                await asyncio.sleep(2.0)
                await page.open(base + "/jobs")
                await page.wait_for_text(["Launched reruns"], 30)
            await page.screenshot(tmp_path / "jobs.png")
            return status, await page.evaluate("document.body.innerText")

    with ui.chromium(binary, 1200, 900) as port:
        status, text = asyncio.run(drive(port))
    server.shutdown()
    assert (tmp_path / "jobs.png").stat().st_size > 10_000
    assert Path(os.environ.get("RERUN_PAGE_SCREENSHOT", tmp_path / "rerun_page.png")).stat().st_size > 10_000
    variant = " ".join([ablation, *overrides.split()])
    new = runs_of(client, exp.experiment_id, f"tags.rerun_of = '{coreg.info.run_id}' and tags.variant = '{variant}'")
    return status, text, new


def test_rerun_page_launches_an_ablation_as_a_local_process_from_a_real_browser(sweep, tmp_path):
    from orchestrator.webui import LocalLauncher

    launcher = LocalLauncher(tmp_path)
    status, text, new = _launch_from_the_browser(sweep, tmp_path, launcher, "no_unlabeled", "1", "training.lr=0.02")
    assert status == "SUCCEEDED", text[-3000:]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert new[0].data.params["params.use_unlabeled"] == "False"
    assert (new[0].data.tags["seed"], new[0].data.params["training.lr"]) == ("1", "0.02")
    assert new[0].info.run_name == "coreg [no_unlabeled training.lr=0.02] s1"


def test_rerun_page_submits_an_ablation_as_a_ray_job_from_a_real_browser(sweep, tmp_path, ray_head):
    """The cluster path: the button submits the rerun through the head's job API; its driver runs
    as a Ray job and its trial on that cluster, and the run lands in the same MLflow store."""
    from orchestrator.webui import RayJobLauncher

    launcher = RayJobLauncher(ray_head)
    status, text, new = _launch_from_the_browser(sweep, tmp_path, launcher, "supcon")
    assert status == "SUCCEEDED", text[-3000:]
    assert "new runs under sweep run" in text  # the job's own log, fetched from the cluster
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert new[0].data.params["params.contrastive"] == "supcon"
    # The jobs page lists the cluster's rerun jobs, so a restarted page still shows this one.
    assert [j.status for j in RayJobLauncher(ray_head).jobs()] == ["SUCCEEDED"]


def test_rerun_page_refuses_an_address_without_a_job_api():
    from orchestrator.webui import LauncherError, RayJobLauncher

    with pytest.raises(LauncherError, match="no Ray job API at http://127.0.0.1:9"):
        RayJobLauncher("http://127.0.0.1:9")


def test_readme_tables_come_from_the_sweeps_own_results_with_machine_and_date(sweep, tmp_path):
    import subprocess
    import sys

    grid, summary, _ = sweep
    client = MlflowClient(grid.resolved_tracking_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert "CPUs" in parent.data.tags["machine"]
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nbefore\n<!-- results:e2e -->\nstale numbers 99.99\n<!-- /results:e2e -->\nafter\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"
    argv = [sys.executable, str(script), str(readme), "e2e", "--tracking-uri", grid.resolved_tracking_uri, "--experiment", "e2e"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("# Project\n\nbefore\n") and text.endswith("after\n")
    tables = Path(client.download_artifacts(parent.info.run_id, "tables/results.md", str(tmp_path))).read_text()
    assert tables.strip().replace("### ", "#### ") in text  # the sweep's own tables, headings one level down
    assert f"Measured on {parent.data.tags['machine']}, " in text and parent.info.run_id in text
    missing = subprocess.run([*argv[:3], "nope", *argv[4:]], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no block <!-- results:nope -->" in missing.stderr
