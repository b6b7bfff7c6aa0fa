"""Rerun any trial of a sweep, with overrides, ablations or other seeds.

    python -m orchestrator.rerun RUN_ID [--set key=value ...] [--ablation NAME ...] [--seeds 0 1 2]

Reads the trial run's ``resolved_config.json`` and its sweep's resolved grid from MLflow, applies
the changes, and runs the new trials through Ray Tune on the grid's cluster (``ray.address``) with
the same MLflow logging as the sweep: the new runs are nested under the same sweep run, tagged
``rerun_of=<RUN_ID>`` and ``variant=<what changed>``, and the sweep's results tables are rebuilt, in
which every variant (``coreg [no_prototypes]``, ``cc [training.lr=0.01]``) is a row of its own.

- ``--set`` takes ``params.<name>=<value>``, ``training.<name>=<value>`` or a bare ``<name>=<value>``
  (the method's parameter if it has one, else a training setting); values are YAML
  (``--set params.contrastive=supcon``), checked as the grid's are: unknown names, wrong types and
  out-of-range values are refused, listing what is allowed.
- ``--ablation`` takes names of the method's ablation switches (``AlgorithmSpec.ablations``); each
  runs as its own variant. An unknown name is refused with the list.
- ``--seeds`` reruns on other seeds (new synthetic annotations are made and cached as needed).

Every trial run's description in the MLflow UI shows these commands ready to copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator import runs
from orchestrator.config import GridError, GridLoader, check_method_settings, parse_grid
from orchestrator.launch import annotate_cells, connect_ray, exit_code, run_trials
from orchestrator.plan import Cell, expand_cells
from trainables.spec import TrialSpec


class RerunError(GridError):
    """The run cannot be rerun as asked (unknown run, key, value or ablation)."""


def parse_overrides(pairs: list[str], method: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``["params.tau_div=0.7", "lr=0.01"]`` -> ``{"params": {...}, "training": {...}}``, checked
    as the grid's ``methods[]`` entries are (:func:`~orchestrator.config.check_method_settings`).
    A bare name is the method's parameter if it has one, else a training setting."""
    from trainables.registry import get

    param_names = {f.name for f in dataclasses.fields(get(method).params)}
    out: dict[str, dict[str, Any]] = {"params": {}, "training": {}}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or not name or section not in ("", "params", "training"):
            problems.append(f"--set {pair!r}: expected params.<name>=<value>, training.<name>=<value> or <name>=<value>")
            continue
        out[section or ("params" if name in param_names else "training")][name] = yaml.load(raw, Loader=GridLoader)  # 1e-3 is a float
    problems += check_method_settings(method, out["params"], out["training"], "--set")
    if not problems:
        try:  # with the run's own params: a check across fields may involve a value the grid set
            get(method).params(**{**params, **out["params"]})
        except (TypeError, ValueError) as err:
            problems.append(f"--set params: {err}")
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
    spec: TrialSpec, run_id: str, *, overrides: list[str], ablations: list[str], seeds: list[int] | None
) -> list[TrialSpec]:
    """The specs of the new trials (one per ablation (or one) x seed)."""
    parsed = parse_overrides(overrides, spec.method, dict(spec.params))
    switches = check_ablations(ablations, spec.method)
    base = spec.replace(
        training=dataclasses.replace(spec.training, **parsed["training"]),
        sampled={},
        rerun_of=run_id,
        mlflow_run_id=None,
        resume_checkpoint=None,
        optuna_trial=None,
    )
    return [
        base.replace(
            params={**spec.params, **parsed["params"], **switches.get(ablation, {})},
            cell=dataclasses.replace(spec.cell, seed=seed),
            variant=variant_label(ablation, parsed),
        )
        for ablation in list(switches) or [None]
        for seed in (seeds if seeds else [spec.seed])
    ]


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

    local = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if local is not None and not Path(local).is_file():  # MLflow would create an empty store there
        raise RerunError(f"no MLflow store at {local}; give the sweep's --tracking-uri (or set MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise RerunError(f"no run {run_id} in {runs.redact(tracking_uri)}: {str(err).splitlines()[0]}") from None
    kind = run.data.tags.get(runs.KIND)
    if kind != runs.TRIAL:
        raise RerunError(f"run {run_id} is a {kind or 'non-sweep'!r} run, not a trial run of a sweep")
    parent = run.data.tags.get(runs.PARENT_TAG)
    spec = TrialSpec.from_config(_load_json(client, run_id, runs.RESOLVED_CONFIG))
    grid = parse_grid(_load_json(client, parent, runs.GRID_RESOLVED), source=f"sweep run {parent}")
    specs = plan_configs(spec, run_id, overrides=list(overrides), ablations=list(ablations), seeds=seeds)
    for s in specs:
        print(f"rerun {s.method} [{s.variant}] seed={s.seed} (signature {s.signature})", flush=True)
    if dry_run:
        return {"configs": specs, "runs": []}
    return _run(specs, grid, tracking_uri, parent)


def _load_json(client, run_id: str, name: str) -> dict[str, Any]:
    import json

    path = client.download_artifacts(run_id, name)
    return json.loads(Path(path).read_text())


def _with_annotations(specs: list[TrialSpec]) -> list[TrialSpec]:
    """The specs with the annotation key of their cells (cached: only new seeds of synthetic
    annotators compute)."""
    from trainables.data.datasets import load_dataset

    cells = [Cell.from_spec(s.cell) for s in specs]
    datasets = {c.dataset: load_dataset(c.dataset) for c in cells}
    annotations = annotate_cells(cells, datasets, Path(specs[0].cache_dir))
    return [s.replace(annotation_key=annotations[c.annotation_job].key) for s, c in zip(specs, cells)]


def _run(specs: list[TrialSpec], grid, tracking_uri: str, parent: str) -> dict[str, Any]:
    from orchestrator import report
    from orchestrator.search import ListSearcher
    from orchestrator.tracking import MlflowTrialCallback, Tracker

    connect_ray(grid)
    specs = _with_annotations(specs)
    tracker = Tracker(tracking_uri, grid.experiment, entry_point="orchestrator.rerun")
    # Named like the sweep's runs, the variant after the label: ``coreg [no_prototypes] q=0.3 s1``.
    names = runs.RunNames(runs.varying_axes(c.spec() for c in expand_cells(grid)))
    callback = MlflowTrialCallback(tracker, parent, names)
    try:
        results = run_trials(
            grid, name=f"{grid.experiment}-rerun-{specs[0].rerun_of[:8]}", searcher=ListSearcher(specs),
            num_samples=len(specs), callback=callback,
        )  # fmt: skip
        interrupted = bool(callback.open_runs())  # Tune stopped early (Ctrl-C, SIGTERM)
    finally:
        callback.close_all("KILLED")
    tables = report.publish(tracker, parent)
    print("\n" + tables.console(), flush=True)
    new_runs = list(callback.runs.values())
    print(f"new runs under sweep run {parent}: {', '.join(new_runs)}", flush=True)
    failed = sum(r.error is not None for r in results)
    return {"configs": specs, "runs": new_runs, "tables": tables, "failed": failed, "interrupted": interrupted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="MLflow run id of a trial run")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('results/mlflow.db').resolve()}"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./results/mlflow.db)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting: params.<name>=<value>, training.<name>=<value> or <name>=<value> "
                        "(repeatable; checked against the method's params dataclass and TrainSettings)")
    parser.add_argument("--ablation", dest="ablations", action="append", default=[], metavar="NAME",
                        help="an ablation switch of the method (repeatable; each is its own variant)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run on these seeds instead of the run's own")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    return exit_code(
        lambda: rerun(args.run_id, args.tracking_uri, overrides=args.overrides, ablations=args.ablations,
                      seeds=args.seeds, dry_run=args.dry_run),
        "interrupted: finished reruns are in MLflow, unfinished ones are marked KILLED",
    )

if __name__ == "__main__":
    sys.exit(main())
