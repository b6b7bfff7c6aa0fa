"""The multi-study Optuna searcher and the per-study ASHA scheduler, without Ray trials."""

from __future__ import annotations

import os

import warnings
from types import SimpleNamespace

import optuna
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from orchestrator.config import parse_grid
from orchestrator.plan import expand
from orchestrator.search import MultiStudySearcher, PerStudyScheduler


def studies(asha_for_cc: bool = False):
    cc_search = {"num_samples": 2}
    if asha_for_cc:
        cc_search["asha"] = {"grace_period": 1, "reduction_factor": 2}
    grid = parse_grid(
        {
            "experiment": "s",
            "datasets": [{"name": "digits"}],
            "annotators": [{"kind": "synthetic"}],
            "grid": {"q": [0.3], "eta": [0.3]},
            "training": {"epochs": 4, "lr": 0.07},
            "methods": [
                {"name": "cc", "search": cc_search},
                {"name": "coreg", "params": {"tau_div": 0.6}, "search": {"num_samples": 1, "space": {"beta1": 0.2}}},
            ],
        }
    )
    return expand(grid)


RESUMED = "/checkpoints/resumed"


def searcher(plans, storage, tracked: bool = False):
    def make(study, sampled, number, resuming):
        return study.trial_config(
            sampled, annotation_key="k", cache_dir="/cache", cpus=1, optuna_trial=number,
            resume_checkpoint=RESUMED if resuming else None,
        )  # fmt: skip

    return MultiStudySearcher(plans, make, storage, tracked=tracked)


def test_round_robin_first_trial_is_the_resolved_config_and_budgets_hold(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plans = studies()
    s = searcher(plans, storage)
    first, second, third = (s.suggest(f"t{i}") for i in range(3))
    assert [c["method"] for c in (first, second, third)] == ["cc", "coreg", "cc"]
    assert first["training"]["lr"] == 0.07  # the grid's value, not a sample
    assert second["params"]["tau_div"] == 0.6 and second["params"]["beta1"] == 0.2  # grid value, fixed override
    coreg_trial = optuna.load_study(study_name=s.study_name(plans[1].study_id), storage=storage).trials[0]
    assert "beta1" not in coreg_trial.params and coreg_trial.params["tau_div"] == 0.6  # fixed: not searched
    assert third["training"]["lr"] != 0.07  # the second cc trial is sampled
    assert s.suggest("t3") is None  # budgets spent, trials still running
    s.on_trial_complete("t0", {"val/covering_rate": 0.5, "test/acc": 0.4, "epoch": 4})
    s.on_trial_complete("t1", {"val/covering_rate": 0.7, "test/acc": 0.6, "epoch": 4})
    s.on_trial_complete("t2", None, error=True)
    # within one driver a failed trial is Tune's to retry (max_retries), not a new Optuna trial
    assert s.suggest("t4") == Searcher.FINISHED

    # A new driver on the same storage (a resumed sweep) sees what is done and redoes the failure.
    again = searcher(studies(), storage)
    redo = again.suggest("r0")
    assert redo["method"] == "cc"
    cc = optuna.load_study(study_name=again.study_name(plans[0].study_id), storage=storage)
    completed = [t for t in cc.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 1 and completed[0].user_attrs["metrics"]["test/acc"] == 0.4
    assert cc.metric_names == [plans[0].objective]  # optuna-dashboard names the objective


def test_interrupted_trials_are_handed_out_again_with_their_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plans = studies()
    s = searcher(plans, storage)
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(3)}  # cc default, coreg default, cc sampled
    s.on_trial_complete("t0", {"val/covering_rate": 0.5, "epoch": 4})
    for epoch, value in ((1, 0.3), (2, 0.35)):
        s.on_trial_result("t1", {"val/covering_rate": value, "epoch": epoch})
    assert s.abandon_live() == 2  # the driver stops with t1 and t2 running

    again = searcher(studies(), storage)
    assert again.resumable() == 2
    resumed = [again.suggest(f"r{i}") for i in range(2)]
    assert all(c["resume_checkpoint"] == RESUMED for c in resumed)
    by_study = {c["study"]: c for c in resumed}
    for old in (configs["t1"], configs["t2"]):
        new = by_study[old["study"]]
        assert new["optuna_trial"] == old["optuna_trial"] and new["signature"] == old["signature"]
    assert again.suggest("r2") is None  # nothing new to ask: the budgets hold
    # t1 resumes from its checkpoint of epoch 1: epoch 2 comes again, and is not reported twice.
    r_t1 = f"r{resumed.index(by_study[configs['t1']['study']])}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a step is reported twice
        for epoch, value in ((2, 0.35), (3, 0.4)):
            again.on_trial_result(r_t1, {"val/covering_rate": value, "epoch": epoch})
    t1 = optuna.load_study(study_name=again.study_name(configs["t1"]["study"]), storage=storage).trials[configs["t1"]["optuna_trial"]]
    assert t1.intermediate_values == {1: 0.3, 2: 0.35, 3: 0.4}
    again.on_trial_complete("r0", {resumed[0]["objective"]: 0.6, "epoch": 4})
    again.on_trial_complete("r1", {resumed[1]["objective"]: 0.7, "epoch": 4})
    assert again.suggest("r3") == Searcher.FINISHED
    states = [t.state for p in plans for t in optuna.load_study(study_name=p.readable_name, storage=storage).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and len(states) == 3


def test_a_tracked_trial_is_told_only_once_its_mlflow_run_is_settled(tmp_path):
    """Tune tells the searcher before the MLflow callback ends the trial's run: with ``tracked``,
    Optuna hears the outcome only from :meth:`settle`; a trial whose run could not be ended (disk
    full) stays RUNNING, and the next driver hands it out again."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plans = studies()
    s = searcher(plans, storage, tracked=True)
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(3)}
    s.on_trial_complete("t0", {"val/covering_rate": 0.5, "test/acc": 0.4, "epoch": 4})
    s.on_trial_complete("t1", {"val/covering_rate": 0.7, "epoch": 4})
    s.on_trial_complete("t2", None, error=True)

    def state(name):
        study_id = configs[name]["study"]
        (summary,) = [x for x in optuna.get_all_study_summaries(storage) if x.user_attrs.get("study_id", x.study_name) == study_id]
        return optuna.load_study(study_name=summary.study_name, storage=storage).trials[configs[name]["optuna_trial"]]

    assert [state(t).state for t in ("t0", "t1", "t2")] == [optuna.trial.TrialState.RUNNING] * 3
    s.settle("t0")  # its run ended FINISHED
    s.settle("t2")  # its run ended FAILED
    assert state("t0").state == optuna.trial.TrialState.COMPLETE and state("t0").user_attrs["metrics"]["test/acc"] == 0.4
    assert state("t2").state == optuna.trial.TrialState.FAIL
    assert s.abandon_live() == 1  # t1's run never ended: left RUNNING, marked interrupted
    assert state("t1").state == optuna.trial.TrialState.RUNNING and state("t1").user_attrs["interrupted"]

    again = searcher(studies(), storage, tracked=True)
    assert again.resumable() == 1
    redo = [again.suggest(f"r{i}") for i in range(2)]
    assert configs["t1"]["optuna_trial"] in [c["optuna_trial"] for c in redo if c["study"] == configs["t1"]["study"]]


def test_finished_when_every_budget_is_spent(tmp_path):
    s = searcher(studies(), f"sqlite:///{tmp_path / 'optuna.db'}")
    for i in range(3):
        config = s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", {config["objective"]: 0.5})
    assert s.suggest("t3") == Searcher.FINISHED


def trial(trial_id, study):
    config = study.trial_config({}, annotation_key="k", cache_dir="/cache", cpus=1).to_config()
    return SimpleNamespace(trial_id=trial_id, config=config)


def test_asha_stops_bad_trials_within_a_study_only(tmp_path):
    plans = studies(asha_for_cc=True)
    cc, coreg = plans
    stopped: set[str] = set()
    scheduler = PerStudyScheduler(plans, stopped)
    good, bad, other = trial("good", cc), trial("bad", cc), trial("other", coreg)
    for t in (good, bad, other):
        scheduler.on_trial_add(None, t)
    # a strong result in another study must not raise the bar for cc's rung
    assert scheduler.on_trial_result(None, other, {"epoch": 1, "val/covering_rate": 0.99}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "val/covering_rate": 0.5}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {"epoch": 1, "val/covering_rate": 0.1}) == TrialScheduler.STOP
    assert stopped == {"bad"}
    # the study without ASHA runs everything to the end
    worse = trial("worse", coreg)
    scheduler.on_trial_add(None, worse)
    assert scheduler.on_trial_result(None, worse, {"epoch": 1, "val/covering_rate": 0.0}) == TrialScheduler.CONTINUE


def _browser_check():
    """scripts/mlflow_ui_check.py (its headless-Chromium helpers), or None without a chromium."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import mlflow_ui_check

    return mlflow_ui_check if mlflow_ui_check.find_chromium() else None


def test_optuna_dashboard_serves_the_studies_with_their_objective(tmp_path):
    """The sweep's last lines tell the user to run ``optuna-dashboard <storage>``: it is installed
    and shows each study's objective by name."""
    import json
    import sys
    import urllib.request
    from pathlib import Path

    from servers import free_port, serving

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plans = studies()
    s = searcher(plans, storage)
    for i in range(2 * len(plans)):  # two finished trials per study: the dashboard plots their history
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", {plans[0].objective: 0.5 + 0.1 * i, "epoch": 1})
    port = free_port()
    dashboard = str(Path(sys.executable).parent / "optuna-dashboard")
    argv = [dashboard, storage, "--host", "127.0.0.1", "--port", str(port)]
    with serving(argv, f"http://127.0.0.1:{port}/api/studies", tmp_path / "dashboard.log", timeout_s=60):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as response:
            listed = {study["study_name"]: study["study_id"] for study in json.load(response)["study_summaries"]}
        name = plans[0].readable_name
        assert name in listed and s.study_name(plans[0].study_id) == name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{listed[name]}", timeout=10) as response:
            detail = json.load(response)
        assert detail["objective_names"] == [plans[0].objective]
        # ... and in a real browser: the study's page with its name, objective and trials
        ui = _browser_check()
        if ui is not None:
            shot = Path(os.environ.get("OPTUNA_SCREENSHOT", tmp_path / "optuna.png"))
            url = f"http://127.0.0.1:{port}/dashboard/studies/{listed[name]}"
            missing = ui.check_page(url, [name, plans[0].objective, "History"], shot, timeout=90)
            assert not missing, missing
            assert shot.stat().st_size > 10_000


def test_studies_are_named_in_words_and_older_or_other_studies_are_kept_apart(tmp_path):
    """A study is named experiment | method | cell; a sweep an older version named by hash resumes
    its study; a readable name held by a study of other settings (the grid's params changed in the
    same storage) is not reused: the new study gets its settings' key appended."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cc, coreg = studies()
    assert cc.readable_name == f"s | cc | {cc.cell.label()}" and "seed" in cc.readable_name
    optuna.create_study(study_name=coreg.study_id, storage=storage)  # as an older version named it
    optuna.create_study(study_name=cc.readable_name, storage=storage).set_user_attr("study_id", "s.cc.0123456789")
    s = searcher([cc, coreg], storage)
    assert s.study_name(coreg.study_id) == coreg.study_id
    assert s.study_name(cc.study_id) == f"{cc.readable_name} [{cc.key}]"
    s.suggest("t0")
    s.suggest("t1")
    assert len(optuna.load_study(study_name=coreg.study_id, storage=storage).trials) == 1
    assert len(optuna.load_study(study_name=cc.readable_name, storage=storage).trials) == 0  # the other settings' study
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    t = searcher([cc, coreg], fresh)
    t.suggest("t0")
    assert sorted(optuna.get_all_study_names(fresh)) == [cc.readable_name]
    assert searcher([cc, coreg], fresh).study_name(cc.study_id) == cc.readable_name  # its own study, found again


def test_a_study_name_keeps_an_experiment_name_with_dots():
    grid = parse_grid({
        "experiment": "fmnist.v2", "datasets": [{"name": "digits"}], "annotators": [{"kind": "synthetic"}],
        "grid": {"q": [0.3], "eta": [0.3]}, "methods": [{"name": "cc"}],
    })  # fmt: skip
    (study,) = expand(grid)
    assert study.readable_name == f"fmnist.v2 | cc | {study.cell.label()}"
