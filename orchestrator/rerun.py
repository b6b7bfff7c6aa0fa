"""Rerun any trial of a sweep, with overrides, ablations or other seeds.

    python -m orchestrator.rerun RUN_ID [--set key=value ...] [--ablation NAME ...] [--seeds 0 1 2]

Reads the trial run's ``resolved_config.json`` and its sweep's resolved grid from MLflow, applies
the changes, and runs the new trials through Ray Tune on the grid's cluster (``ray.address``) with
the same MLflow logging as the sweep: the new runs are nested under the same sweep run, tagged
``rerun_of=<RUN_ID>`` and ``variant=<what changed>``, and the sweep's results tables are rebuilt, in
which every variant (``coreg [no_prototypes]``, ``cc [training.lr=0.01]``) is a row of its own.

- ``--set`` takes ``params.<name>=<value>``, ``training.<name>=<value>`` or a bare ``<name>=<value>``
  (the method's parameter if it has one, else a training setting); values are YAML
  (``--set params.contrastive=supcon``). Unknown names and wrong types are refused, listing what
  is allowed.
- ``--ablation`` takes names of the method's ablation switches (``AlgorithmSpec.ablations``); each
  runs as its own variant. An unknown name is refused with the list.
- ``--seeds`` reruns on other seeds (new synthetic annotations are made and cached as needed).

Every trial run's description in the MLflow UI shows these commands ready to copy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import GridError, parse_grid, signature
from orchestrator.sweep import stop_on_sigterm
from trainables.api import TrainSettings


class RerunError(GridError):
    """The run cannot be rerun as asked (unknown run, key, value or ablation)."""


def parse_overrides(pairs: list[str], method: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``["params.tau_div=0.7", "lr=0.01"]`` -> ``{"params": {...}, "training": {...}}``, checked."""
    from trainables.registry import get

    spec = get(method)
    param_names = {f.name for f in dataclasses.fields(spec.params)}
    training_names = {f.name for f in dataclasses.fields(TrainSettings)}
    out: dict[str, dict[str, Any]] = {"params": {}, "training": {}}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set {pair!r}: expected key=value")
            continue
        value = yaml.safe_load(raw)
        section, _, name = key.rpartition(".")
        if not section:
            section = "params" if name in param_names else "training" if name in training_names else ""
        allowed = {"params": param_names, "training": training_names}.get(section)
        if allowed is None or name not in allowed:
            problems.append(
                f"--set {key}: {method} has no such setting; params: {', '.join(sorted(param_names)) or '(none)'}; "
                f"training: {', '.join(sorted(training_names))}"
            )
            continue
        out[section][name] = value
    try:
        spec.params(**{**params, **out["params"]})
    except (TypeError, ValueError) as err:
        problems.append(f"--set params: {err}")
    for name, value in out["training"].items():
        default = getattr(TrainSettings(), name)
        if type(value) is not type(default) and not (isinstance(default, float) and isinstance(value, int)):
            problems.append(f"--set training.{name}={value!r}: expected a {type(default).__name__}")
    if problems:
        raise RerunError("\n  ".join(["cannot apply the overrides:", *problems]))
    return out


def check_ablations(names: list[str], method: str) -> dict[str, dict[str, Any]]:
    from trainables.registry import get

    known = get(method).ablations
    unknown = [n for n in names if n not in known]
    if unknown:
        allowed = ", ".join(known) if known else f"none ({method} has no ablation switches)"
        raise RerunError(f"--ablation {', '.join(unknown)}: unknown for {method}; allowed: {allowed}")
    return {n: known[n] for n in names}


def variant_label(ablation: str | None, overrides: dict[str, dict[str, Any]]) -> str:
    """The row a rerun gets in the tables: what changed, or ``rerun`` (same config, e.g. other seeds)."""
    parts = [ablation] if ablation else []
    parts += [f"{section}.{k}={v}" for section in ("params", "training") for k, v in overrides[section].items()]
    return " ".join(parts) or "rerun"


def plan_configs(
    config: dict[str, Any], run_id: str, *, overrides: list[str], ablations: list[str], seeds: list[int] | None
) -> list[dict[str, Any]]:
    """The resolved configs of the new trials (one per ablation (or one) x seed)."""
    method = config["method"]
    parsed = parse_overrides(overrides, method, config["params"])
    switches = check_ablations(ablations, method)
    configs = []
    for ablation in list(switches) or [None]:
        for seed in seeds if seeds else [config["cell"]["seed"]]:
            new = copy.deepcopy(config)
            for key in ("mlflow_run_id", "resume_checkpoint", "optuna_trial", "sampled"):
                new.pop(key, None)
            new["params"].update(parsed["params"])
            if ablation is not None:
                new["params"].update(switches[ablation])
            new["training"].update(parsed["training"])
            new["cell"]["seed"] = seed
            new["rerun_of"] = run_id
            new["variant"] = variant_label(ablation, parsed)
            new["signature"] = signature({k: new[k] for k in ("method", "cell", "params", "training", "annotation_key")})
            configs.append(new)
    return configs


def _annotation_for(config: dict[str, Any]) -> str:
    """Annotate the cell of ``config`` (cached: only new seeds of synthetic annotators compute)."""
    from pydantic import TypeAdapter

    from orchestrator.annotation.stage import annotate
    from orchestrator.config import AnnotatorSpec, DatasetSpec
    from trainables.data.datasets import load_dataset

    cell = config["cell"]
    ann = annotate(
        load_dataset(DatasetSpec(**cell["dataset"])),
        TypeAdapter(AnnotatorSpec).validate_python(cell["annotator"]),
        q=cell["q"],
        eta=cell["eta"],
        seed=cell["seed"],
        cache_dir=Path(config["cache_dir"]),
    )
    return ann.key


def rerun(
    run_id: str,
    tracking_uri: str,
    *,
    overrides: list[str] = (),
    ablations: list[str] = (),
    seeds: list[int] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RerunError(f"no run {run_id} in {tracking_uri}: {str(err).splitlines()[0]}") from None
    if run.data.tags.get("kind") != "trial":
        raise RerunError(f"run {run_id} is a {run.data.tags.get('kind', 'non-sweep')!r} run, not a trial run of a sweep")
    parent = run.data.tags.get("mlflow.parentRunId")
    config = _load_json(client, run_id, "resolved_config.json")
    grid = parse_grid(_load_json(client, parent, "grid_resolved.json"), source=f"sweep run {parent}")
    configs = plan_configs(config, run_id, overrides=list(overrides), ablations=list(ablations), seeds=seeds)
    for c in configs:
        print(f"rerun {c['method']} [{c['variant']}] seed={c['cell']['seed']} (signature {c['signature']})", flush=True)
    if dry_run:
        return {"configs": configs, "runs": []}
    return _run(configs, grid, tracking_uri, parent)


def _load_json(client, run_id: str, name: str) -> dict[str, Any]:
    import json

    path = client.download_artifacts(run_id, name)
    return json.loads(Path(path).read_text())


def _run(configs: list[dict[str, Any]], grid, tracking_uri: str, parent: str) -> dict[str, Any]:
    from ray import tune
    from ray.tune.search import Searcher

    from orchestrator import report
    from orchestrator.sweep import connect_ray, describe_trial, trial_tags
    from orchestrator.tracking import ConsoleProgress, MlflowTrialCallback, Tracker
    from trainables.loop import train_trial

    connect_ray(grid)
    for c in configs:
        c["annotation_key"] = _annotation_for(c)
        c["signature"] = signature({k: c[k] for k in ("method", "cell", "params", "training", "annotation_key")})

    class ListSearcher(Searcher):
        def __init__(self, todo: list[dict[str, Any]]):
            super().__init__()
            self.todo = list(todo)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            return self.todo.pop(0) if self.todo else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

    def tags_for(config: dict[str, Any]) -> dict[str, str]:
        return {**trial_tags(config), "rerun_of": config["rerun_of"], "variant": config["variant"]}

    tracker = Tracker(tracking_uri, grid.experiment)
    callback = MlflowTrialCallback(tracker, parent, tags_for, describe=lambda c, r: describe_trial(c, r, tracking_uri))
    cpus = grid.resources.cpus_per_trial
    try:
        tuner = tune.Tuner(
            tune.with_resources(train_trial, {"cpu": cpus, "gpu": grid.resources.gpus_per_trial}),
            tune_config=tune.TuneConfig(
                search_alg=ListSearcher(configs),
                num_samples=len(configs),
                max_concurrent_trials=grid.resources.max_concurrent_trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{grid.experiment}-rerun-{configs[0]['rerun_of'][:8]}",
                storage_path=str(grid.storage_path / "ray_results"),
                callbacks=[callback, ConsoleProgress(len(configs), lambda c: f"{c['method']} [{c['variant']}] seed={c['cell']['seed']}")],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=grid.max_retries),
                verbose=0,
            ),
        )
        results = list(tuner.fit())
        interrupted = bool(callback.open_runs())  # Tune stopped early (Ctrl-C, SIGTERM)
    finally:
        callback.close_all("KILLED")
    tables = report.publish(tracker, parent)
    print("\n" + tables.console(), flush=True)
    runs = list(callback.runs.values())
    print(f"new runs under sweep run {parent}: {', '.join(runs)}", flush=True)
    failed = sum(r.error is not None for r in results)
    return {"configs": configs, "runs": runs, "tables": tables, "failed": failed, "interrupted": interrupted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="MLflow run id of a trial run")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('results/mlflow.db').resolve()}"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./results/mlflow.db)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ablation", dest="ablations", action="append", default=[], metavar="NAME",
                        help="an ablation switch of the method (repeatable; each is its own variant)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run on these seeds instead of the run's own")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    try:
        out = rerun(args.run_id, args.tracking_uri, overrides=args.overrides, ablations=args.ablations,
                    seeds=args.seeds, dry_run=args.dry_run)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished reruns are in MLflow, unfinished ones are marked KILLED", file=sys.stderr)
        return 130
    if out.get("interrupted"):
        return 130
    return 1 if out.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
