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
        ("datasets.0.name", "cifar11", "unknown dataset 'cifar11' (did you mean 'cifar10'?); allowed: "),
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


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "content, expected",
    [
        (BOMB.encode(), "expands to more than 100000 nodes"),  # 10^9 leaves from a 300-byte file
        (("x: " + "[" * 60 + "]" * 60 + "\n").encode(), "nested deeper than 40 levels"),
        (b"experiment: caf\xe9\n", "not UTF-8 text"),
    ],
)
def test_hostile_yaml_is_refused_before_it_is_built(tmp_path, capsys, content, expected):
    bad = tmp_path / "g.yaml"
    bad.write_bytes(content)
    with pytest.raises(GridError, match=expected):
        load_grid(bad)
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_floats_without_a_dot_are_floats(tmp_path):
    good = tmp_path / "g.yaml"
    good.write_text(yaml.safe_dump(base()).replace("methods:", "training: {lr: 1e-3, weight_decay: 5E-4}\nmethods:"))
    grid = load_grid(good)
    assert grid.training.lr == 0.001 and grid.training.weight_decay == 0.0005


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("grid.seeds", [-1], "grid.seeds: seeds = -1 is negative"),
        ("training.epochs", 10**9, "training.epochs: Input should be less than or equal to 100000"),
        ("tracking_uri", "htp://host:5000", "tracking_uri: tracking_uri scheme 'htp' is not one MLflow serves"),
    ],
)
def test_values_past_validation_before_are_refused(path, value, expected):
    assert expected in error_of(with_(path, value))


def test_rerun_overrides_read_values_as_the_grid_does():
    from orchestrator.rerun import RerunError, parse_overrides

    assert parse_overrides(["lr=1e-3", "params.warmup_epochs=2"], "coreg", {}) == {
        "params": {"warmup_epochs": 2},
        "training": {"lr": 0.001},
    }
    with pytest.raises(RerunError, match="--set.training.momentum: Input should be less than 1"):
        parse_overrides(["momentum=1.5"], "coreg", {})


def test_a_storage_path_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    raw = {**base(), "storage": str(blocker / "sweep")}
    good = tmp_path / "g.yaml"
    good.write_text(yaml.safe_dump(raw))
    assert main([str(good)]) == 2
    assert f"storage: {blocker} is not a directory" in capsys.readouterr().err
    raw["storage"] = str(blocker)
    good.write_text(yaml.safe_dump(raw))
    assert main([str(good), "--dry-run"]) == 2
    assert f"storage: {blocker} exists and is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml", "results"]  # nothing written


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"lr": {"low": "0.01", "high": 0.1}}, "search.space.lr.low: Input should be a valid number"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "search.space.lr: low 0.1 > high 0.01"),
        ({"lr": {"low": -1.0, "high": 0.1}}, "search.space.lr.low: Input should be greater than 0"),
        ({"lr": "fast"}, "search.space.lr: Input should be a valid number"),
        ({"lr": {"choices": []}}, "search.space.lr.choices: a non-empty list"),
        ({"lr": {"choices": [0.1, "x"]}}, "search.space.lr.choices[1]: Input should be a valid number"),
        ({"lr": {"step": 2}}, "search.space.lr: allowed keys are low, high, log, choices"),
    ],
)
def test_search_space_overrides_are_checked_against_the_declared_ranges(space, expected):
    raw = base()
    raw["methods"] = [{"name": "cc", "search": {"space": space}}]
    assert expected in error_of(raw)


def test_sizes_the_data_cannot_meet_are_refused_before_ray_starts(tmp_path, capsys):
    raw = {**base(), "storage": str(tmp_path / "results")}
    raw["grid"] = {**raw["grid"], "shots": [0, 500]}
    raw["methods"] = [{"name": "cc", "training": {"batch_size": 5000}}, {"name": "proden"}]
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "grid.shots: 500 exceeds the" in err and "smallest class" in err
    assert "methods[0] (cc): training.batch_size 5000 exceeds the" in err and "methods[1]" not in err
    assert not (tmp_path / "results").exists()


def test_unreachable_services_are_refused_quickly_before_ray_starts(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as probe:  # a free port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw = {**base(), "storage": str(tmp_path / "results"), "tracking_uri": f"http://127.0.0.1:{port}",
           "ray": {"address": f"127.0.0.1:{port}"}}  # fmt: skip
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump(raw))
    tic = time.monotonic()
    assert main([str(bad)]) == 2
    assert time.monotonic() - tic < 30
    err = capsys.readouterr().err
    assert f"tracking_uri: nothing answers at 127.0.0.1:{port}" in err
    assert f"ray.address: nothing answers at 127.0.0.1:{port}" in err
    assert not (tmp_path / "results").exists()


def test_misspelt_names_get_a_did_you_mean():
    raw = base()
    raw["trainig"] = {}
    raw["datasets"] = [{"name": "digit", "subsampel": 3}]
    message = error_of(raw)
    assert "trainig: unknown key (did you mean 'training'?)" in message
    assert "datasets[0].subsampel: unknown key (did you mean 'subsample'?)" in message
    assert "datasets[0].name: unknown dataset 'digit' (did you mean 'digits'?)" in message
    raw = base()
    raw["methods"] = [{"name": "corgg"}, {"name": "coreg", "params": {"tau_dvi": 1}}, {"name": "cc", "search": {"space": {"lrr": 1}}}]
    message = error_of(raw)
    assert "methods[0].name: unknown method 'corgg' (did you mean 'coreg'?)" in message
    assert "methods[1].params.tau_dvi: unknown parameter of coreg (did you mean 'tau_div'?)" in message
    assert "methods[2].search.space.lrr: not a parameter of the cc search space (did you mean 'lr'?)" in message


def test_rerun_never_creates_a_store_it_did_not_find(tmp_path, capsys):
    from orchestrator.rerun import main as rerun_main

    missing = tmp_path / "results" / "mlflow.db"
    assert rerun_main(["0123abcd", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err
    assert not missing.exists() and not missing.parent.exists()


def test_clip_peft_settings_sign_only_the_runs_on_that_backbone():
    """The PEFT settings identify a clip_peft run; on the other backbones they are left out of the
    signature, so the runs of grids written before they existed keep their identities."""
    raw = base()
    study = expand(parse_grid(raw))[0]
    plain = study.trial_config({}, annotation_key="k", cache_dir="/x", cpus=1)
    assert not {"peft", "lora_rank", "adapter_dim", "vpt_tokens", "vpt_deep"} & set(plain.training.signed())
    other_rank = plain.replace(training=dataclasses.replace(plain.training, lora_rank=32))
    assert other_rank.signature == plain.signature
    on_clip = plain.replace(training=dataclasses.replace(plain.training, backbone="clip_peft"))
    assert on_clip.replace(training=dataclasses.replace(on_clip.training, lora_rank=32)).signature != on_clip.signature
    # VPT's settings sign a run with vpt among its modules only
    assert on_clip.replace(training=dataclasses.replace(on_clip.training, vpt_tokens=50)).signature == on_clip.signature
    with_vpt = on_clip.replace(training=dataclasses.replace(on_clip.training, peft=["vpt", "lora"]))
    assert with_vpt.signature != on_clip.signature
    for change in ({"vpt_tokens": 50}, {"vpt_deep": False}):
        assert with_vpt.replace(training=dataclasses.replace(with_vpt.training, **change)).signature != with_vpt.signature


CLIP_PEFT_KEYS = {  # (study id, first trial's signature), as computed before VPT and combinations existed
    "lora": ("x.cc.e06c0b072e", "e55d88d5be43"),
    "adapter": ("x.cc.c2c70c8122", "e7ac39729b9a"),
    "small_cnn": ("x.cc.f7bed33558", "73cee760a498"),
}


@pytest.mark.parametrize("name, training", [
    ("lora", {"backbone": "clip_peft"}), ("lora", {"backbone": "clip_peft", "peft": "lora"}),
    ("lora", {"backbone": "clip_peft", "peft": ["lora"]}), ("adapter", {"backbone": "clip_peft", "peft": "adapter", "adapter_dim": 16}),
    ("small_cnn", {"backbone": "small_cnn"}),
])  # fmt: skip
def test_a_single_peft_choice_keeps_the_run_keys_it_had(name, training):
    """A grid of one PEFT module (a name, or a list of one) keeps its study id and trial signature:
    its resumable sweeps and reruns find their runs. Combinations are recorded canonical."""
    raw = {"experiment": "x", "datasets": [{"name": "digits"}], "annotators": [{"kind": "clip"}], "methods": [{"name": "cc"}]}
    study = expand(parse_grid({**raw, "training": training}))[0]
    trial = study.trial_config({}, annotation_key="k", cache_dir="/x", cpus=1)
    assert (study.study_id, trial.signature) == CLIP_PEFT_KEYS[name]


def test_a_peft_combination_is_recorded_readably_and_in_canonical_order():
    from orchestrator.tracking import flatten

    raw = {"experiment": "x", "datasets": [{"name": "digits"}], "annotators": [{"kind": "clip"}], "methods": [{"name": "cc"}]}
    trials = []
    for peft in (["bias", "vpt", "lora"], ["lora", "vpt", "bias"], "lora+vpt+bias"):
        study = expand(parse_grid({**raw, "training": {"backbone": "clip_peft", "peft": peft}}))[0]
        trials.append((study.study_id, study.trial_config({}, annotation_key="k", cache_dir="/x", cpus=1)))
    assert len({(study_id, trial.signature) for study_id, trial in trials}) == 1
    config = trials[0][1].to_config()
    assert flatten(config)["training.peft"] == "lora+vpt+bias"  # the MLflow param
    assert TrialSpec.from_config(json.loads(json.dumps(config))).signature == trials[0][1].signature
