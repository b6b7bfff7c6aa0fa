"""grid.yaml is strict: every kind of mistake fails before Ray starts, naming the key."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.config import GridError, load_grid, parse_grid
from orchestrator.plan import expand, expand_cells
from orchestrator.sweep import DEFAULT_GRID, main
from trainables.spec import TrialSpec

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "experiment": "t",
        "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}],
        "grid": {"q": [0.3], "eta": [0.1, 0.3], "seeds": [0, 1]},
        "methods": [{"name": "cc"}, {"name": "proden"}],
    }


def with_(path: str, value) -> dict:
    """A copy of ``base()`` with one key set (dotted path; integers index lists)."""
    raw = copy.deepcopy(base())
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def error_of(raw: dict) -> str:
    with pytest.raises(GridError) as info:
        parse_grid(raw)
    return str(info.value)


def test_base_grid_is_valid_and_expands():
    grid = parse_grid(base())
    cells = expand_cells(grid)
    assert len(cells) == 1 * 1 * 2 * 2  # q x eta x seeds
    assert {(c.q, c.eta, c.seed) for c in cells} == {(0.3, e, s) for e in (0.1, 0.3) for s in (0, 1)}
    studies = expand(grid)
    assert len(studies) == len(cells) * 2
    assert len({s.study_id for s in studies}) == len(studies)


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("bogus", 1, "bogus: unknown key"),
        ("grid.etta", [0.1], "grid.etta: unknown key"),
        ("grid.eta", [1.0], "eta = 1.0 is outside [0, 1)"),
        ("grid.eta", [-0.1], "eta = -0.1 is outside [0, 1)"),
        ("grid.q", [1.5], "q = 1.5 is outside [0, 1]"),
        ("grid.shots", [-1], "shots = -1 is negative"),
        ("grid.unlabeled_fraction", [0.0], "outside (0, 1]"),
        ("grid.seeds", [], "at least one value"),
        ("grid.seeds", "zero", "grid.seeds"),
        ("datasets.0.name", "cifar11", "unknown dataset 'cifar11'; allowed: "),
        ("datasets.0.subsample", -5, "datasets[0].subsample"),
        ("annotators.0.kind", "gpt", "unknown annotator kind 'gpt'"),
        ("methods.0.name", "nope", "methods[0].name: unknown method 'nope'; allowed: "),
        ("methods.0.params", {"no_such": 1}, "methods[0].params.no_such: unknown parameter of cc"),
        ("methods.0.search", {"objective": "test/acc"}, "uses test labels"),
        ("methods.0.search", {"num_samples": 0}, "methods[0].search.num_samples"),
        ("methods.0.search", {"space": {"not_a_param": 1}}, "methods[0].search.space.not_a_param: not a parameter"),
        ("resources.gpus_per_trial", -1, "resources.gpus_per_trial"),
        ("training.epochs", "ten", "training.epochs"),
        ("training.backbone", "vit", "training.backbone"),
    ],
)
def test_bad_values_name_the_key(path, value, expected):
    assert expected in error_of(with_(path, value))


def test_axes_that_do_not_apply_are_refused():
    raw = base()
    raw["annotators"] = [{"kind": "clip", "pretrained": None}]
    msg = error_of(raw)
    assert "grid.q: applies only to synthetic annotators" in msg
    assert "grid.eta: applies only to synthetic annotators" in msg
    raw["grid"] = {"seeds": [0]}
    parse_grid(raw)  # without q/eta the CLIP grid is valid


def test_synthetic_annotator_needs_q_and_eta():
    raw = base()
    raw["grid"] = {"seeds": [0]}
    assert "grid.q: required by the synthetic annotator" in error_of(raw)


def test_method_param_types_are_checked():
    raw = base()
    raw["methods"] = [{"name": "coreg", "params": {"tau_div": "high"}}]
    msg = error_of(raw)
    assert "methods[0].params.tau_div" in msg


def test_every_problem_is_reported_at_once():
    raw = with_("grid.eta", [2.0])
    raw["bogus"] = 1
    msg = error_of(raw)
    assert "bogus: unknown key" in msg and "eta = 2.0" in msg


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(bad)
    with pytest.raises(GridError, match="no such grid file"):
        load_grid(tmp_path / "missing.yaml")


def test_cli_reports_grid_errors_without_starting_ray(tmp_path, capsys):
    import ray

    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump(with_("grid.eta", [1.5])))
    was_running = ray.is_initialized()
    assert main([str(bad)]) == 2
    assert "eta = 1.5 is outside [0, 1)" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


def test_default_grid_is_the_repository_grid_and_valid(capsys):
    assert (ROOT / "grid.yaml").resolve() == DEFAULT_GRID.resolve()
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid is valid" in out
    names = {m.name for m in load_grid(DEFAULT_GRID).methods}
    assert {"coreg", "proden", "cc"} <= names


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_are_valid(path):
    grid = load_grid(path)
    assert expand(grid)


def test_trial_signature_depends_on_what_determines_the_result():
    grid = parse_grid(base())
    study = expand(grid)[0]
    a = study.trial_config({"lr": 0.1}, annotation_key="k", cache_dir="/x", cpus=1)
    b = study.trial_config({"lr": 0.1}, annotation_key="k", cache_dir="/elsewhere", cpus=2)
    c = study.trial_config({"lr": 0.2}, annotation_key="k", cache_dir="/x", cpus=1)
    assert a.signature == b.signature != c.signature
    assert a.training.lr == 0.1 and c.training.lr == 0.2
    # the signature survives the round trip through Tune's config / resolved_config.json
    back = TrialSpec.from_config(json.loads(json.dumps(a.to_config())))
    assert back == a and back.signature == a.signature
    assert a.replace(cell=dataclasses.replace(a.cell, seed=9)).signature != a.signature


def test_labels_let_one_grid_hold_variants_of_a_method():
    raw = base()
    raw["methods"] = [{"name": "cc"}, {"name": "cc", "label": "cc-slow", "training": {"lr": 0.01}}]
    studies = expand(parse_grid(raw))
    assert len({s.study_id for s in studies}) == len(studies)
    configs = [s.trial_config({}, annotation_key="k", cache_dir="/c", cpus=1) for s in studies]
    assert {c.label for c in configs} == {"cc", "cc-slow"} and {c.method for c in configs} == {"cc"}
    raw["methods"] = [{"name": "cc"}, {"name": "cc"}]
    assert "duplicate name(s) ['cc']" in error_of(raw)


def test_training_schema_is_derived_from_train_settings():
    from orchestrator.config import TrainingSpec
    from trainables.api import TrainSettings

    assert set(TrainingSpec.model_fields) == {f.name for f in dataclasses.fields(TrainSettings)}
    raw = base()
    raw["training"] = {"momentum": 1.5, "scheduler": "step", "backbone": "vit"}
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    for key in ("training.momentum", "training.scheduler", "training.backbone"):
        assert key in str(err.value)


@pytest.mark.parametrize(
    "params, training, expected",
    [
        ({"no_such": 1}, {}, "--set.params.no_such: unknown parameter of coreg"),
        ({}, {"no_such": 1}, "--set.training.no_such: unknown training setting of coreg"),
        ({}, {"momentum": 1.5}, "--set.training.momentum: Input should be less than 1"),
        ({}, {"scheduler": "step"}, "--set.training.scheduler: Input should be 'cosine' or 'constant'"),
        ({}, {"epochs": "ten"}, "--set.training.epochs: Input should be a valid integer"),
        ({"warmup_epochs": "two"}, {}, "--set.params.warmup_epochs: Input should be a valid integer"),
    ],
)
def test_method_settings_are_checked_one_way_for_the_grid_and_reruns(params, training, expected):
    from orchestrator.config import check_method_settings

    problems = check_method_settings("coreg", params, training, "--set")
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    assert check_method_settings("coreg", {"warmup_epochs": 2}, {"lr": 0.01, "epochs": 3}, "--set") == []
