"""Run a study: ``python -m orchestrator.sweep [grid.yaml]``.

The data flows one way: grid.yaml -> validated grid -> cells and studies -> annotations (Ray Data,
cached) -> trials (Ray Tune + one Optuna study per cell and method) -> MLflow. Everything that can
be checked without Ray (the grid, the data set files, the annotator's model files) is checked
first, so a bad grid fails in a second with a message naming the key, not after the cluster spun up.

Without an argument the grid embedded in the package (``orchestrator/default_grid.yaml``, the same
file as the repository's ``grid.yaml``) runs: sklearn's digits with the synthetic annotator, Co-Reg,
PRODEN and CC, on a local Ray and a local sqlite MLflow store; no GPU or internet needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchestrator.config import ClipAnnotatorSpec, Grid, GridError, load_grid, signature
from orchestrator.plan import Cell, Study, expand

DEFAULT_GRID = Path(__file__).with_name("default_grid.yaml")
log = logging.getLogger("orchestrator.sweep")


def check_inputs(grid: Grid) -> dict[str, Any]:
    """Load every data set and check every annotator's model files before Ray starts.

    Returns the loaded data sets by name (the annotation stage reuses them)."""
    from trainables.common.data import load_dataset

    problems, datasets = [], {}
    for i, spec in enumerate(grid.datasets):
        try:
            datasets[spec.name] = load_dataset(spec)
        except (FileNotFoundError, RuntimeError, OSError, ValueError) as err:
            problems.append(f"datasets[{i}] ({spec.name}): {err}")
    for i, ann in enumerate(grid.annotators):
        if not isinstance(ann, ClipAnnotatorSpec):
            continue
        if ann.model_config_path is not None and not Path(ann.model_config_path).is_file():
            problems.append(f"annotators[{i}].model_config_path: no such file {ann.model_config_path}")
        elif ann.model_config_path is None:
            import open_clip

            if ann.model not in open_clip.list_models():
                problems.append(
                    f"annotators[{i}].model: open_clip has no model {ann.model!r} "
                    "(see open_clip.list_models(), or give model_config_path)"
                )
        pretrained = ann.pretrained or ""
        if ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))) and not (
            Path(pretrained).exists() or pretrained.startswith("hf-hub:")
        ):
            problems.append(f"annotators[{i}].pretrained: no such checkpoint file {pretrained}")
        for name, ds in datasets.items():
            if ann.class_names is not None and len(ann.class_names) != len(ds.class_names):
                problems.append(
                    f"annotators[{i}].class_names: {len(ann.class_names)} names but {name} has "
                    f"{len(ds.class_names)} classes"
                )
    if problems:
        raise GridError("inputs are not usable:\n  " + "\n  ".join(problems))
    return datasets


def run_annotations(grid: Grid, studies: list[Study], datasets: dict, tracker, parent: str) -> dict[tuple, Any]:
    """Annotate (or load from the cache) every distinct annotation the studies need."""
    from orchestrator.annotation.stage import annotate

    cache_dir = grid.storage_path / "annotations"
    jobs: dict[tuple, Cell] = {}
    for study in studies:
        jobs.setdefault(study.cell.annotation_job, study.cell)
    annotations = {}
    for n, (job, cell) in enumerate(jobs.items(), 1):
        tic = time.perf_counter()
        ann = annotate(
            datasets[cell.dataset.name],
            cell.annotator,
            q=cell.q,
            eta=cell.eta,
            seed=cell.seed,
            cache_dir=cache_dir,
            progress=_progress_printer(f"[annotate {n}/{len(jobs)}] {cell.dataset.name} {cell.annotator.name}"),
        )
        annotations[job] = ann
        tags = cell.tags()
        if cell.annotator.kind != "synthetic":
            tags["seed"] = ""
        tracker.log_annotation(parent, ann, tags, cell.as_config())
        stats = ", ".join(f"{k}={v:.3f}" for k, v in ann.stats.items() if k in ("partial_acc", "mean_set_size", "zs_acc_test"))
        source = "cache" if ann.cached else f"{time.perf_counter() - tic:.1f}s"
        print(f"[annotate {n}/{len(jobs)}] {cell.label(with_seed=cell.annotator.kind == 'synthetic')}: {stats} ({source})", flush=True)
    return annotations


def _progress_printer(prefix: str, every_s: float = 5.0):
    """``progress(done, total)`` callback that prints at most every ``every_s`` seconds."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            print(f"{prefix}: {done}/{total} images", flush=True)

    return progress


def trial_tags(config: dict[str, Any]) -> dict[str, str]:
    cell = config["cell"]
    tags = {
        "method": config["method"],
        "dataset": cell["dataset"]["name"],
        "annotator": cell["annotator"]["name"],
        "q": "" if cell["q"] is None else f"{cell['q']:g}",
        "eta": "" if cell["eta"] is None else f"{cell['eta']:g}",
        "shots": str(cell["shots"]),
        "fraction": f"{cell['unlabeled_fraction']:g}",
        "seed": str(cell["seed"]),
        "signature": config["signature"],
        "study": config["study"],
        "objective": config["objective"],
    }
    tags["cell"] = " ".join(
        [tags["dataset"], tags["annotator"]]
        + [f"{k}={tags[k]}" for k in ("q", "eta") if tags[k]]
        + [f"shots={tags['shots']}", f"frac={tags['fraction']}", f"seed={tags['seed']}"]
    )
    return tags


def summarize(studies: list[Study], storage: str) -> tuple[str, list[dict]]:
    """Per cell (seeds pooled) and method: the best trial of each seed's study by its label-free
    objective, then mean +- std over seeds of its last-epoch and selected test accuracy.

    Read from the Optuna storage, so it covers every trial of the studies, whichever sweep ran it."""
    import optuna

    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for study in studies:
        try:
            loaded = optuna.load_study(study_name=study.study_id, storage=storage)
            best = loaded.best_trial
        except (KeyError, ValueError):  # study never started, or no completed trial
            continue
        grouped[(study.cell.label(with_seed=False), study.method.name)].append(best.user_attrs.get("metrics", {}))
    rows = []
    for (cell, method), runs in sorted(grouped.items()):
        last = [m.get("test/acc", float("nan")) for m in runs]
        sel = [m.get("test/acc_selected", float("nan")) for m in runs]
        rows.append(
            {
                "cell": cell,
                "method": method,
                "seeds": len(runs),
                "test_acc_mean": statistics.fmean(last),
                "test_acc_std": statistics.stdev(last) if len(last) > 1 else 0.0,
                "selected_acc_mean": statistics.fmean(sel),
                "selected_acc_std": statistics.stdev(sel) if len(sel) > 1 else 0.0,
            }
        )
    lines = ["| cell | method | seeds | test acc % (last epoch) | test acc % (label-free selected) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['seeds']} | {100 * r['test_acc_mean']:.2f} +- {100 * r['test_acc_std']:.2f} "
            f"| {100 * r['selected_acc_mean']:.2f} +- {100 * r['selected_acc_std']:.2f} |"
        )
    return "\n".join(lines), rows


def run(grid: Grid, grid_path: Path | None = None) -> dict[str, Any]:
    """Run the whole sweep. Returns a dict with the tracking URI, parent run id and summary rows."""
    # Small trials checkpoint often; Tune's advice to checkpoint less is noise for them.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    from orchestrator.search import MultiStudySearcher, PerStudyScheduler
    from orchestrator.tracking import ConsoleProgress, MlflowTrialCallback, Tracker
    from trainables.loop import train_trial

    studies = expand(grid)
    datasets = check_inputs(grid)
    storage = grid.storage_path
    storage.mkdir(parents=True, exist_ok=True)
    total = sum(s.method.search.num_samples for s in studies)
    grid_sig = signature(grid.model_dump())
    print(
        f"experiment {grid.experiment!r}: {len({s.cell for s in studies})} cells x "
        f"{len(grid.methods)} methods = {len(studies)} studies, {total} trials\n"
        f"  storage:  {storage}\n  tracking: {grid.resolved_tracking_uri}",
        flush=True,
    )

    tracker = Tracker(grid.resolved_tracking_uri, grid.experiment, artifact_location=grid.artifact_location)
    parent = tracker.start_run(
        f"sweep {grid.experiment} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        {"kind": "sweep", "grid_signature": grid_sig, "grid_file": str(grid_path or "")},
    )
    tracker.log_dict(parent, grid.model_dump(mode="json"), "grid_resolved.json")
    if grid_path is not None:
        tracker.log_file(parent, grid_path)
    tracker.log_params(parent, {"num_studies": str(len(studies)), "num_trials": str(total), "grid_signature": grid_sig})

    callback = MlflowTrialCallback(tracker, parent, trial_tags)
    searcher = None
    status = "FAILED"
    try:
        if not ray.is_initialized():
            if grid.ray.address:
                ray.init(address=grid.ray.address, log_to_driver=False)
            else:
                ray.init(num_cpus=grid.ray.num_cpus, include_dashboard=False, log_to_driver=False)
        annotations = run_annotations(grid, studies, datasets, tracker, parent)
        cache_dir = str(storage / "annotations")
        cpus = grid.resources.cpus_per_trial

        def make_config(study: Study, sampled: dict[str, Any]) -> dict[str, Any]:
            ann = annotations[study.cell.annotation_job]
            return study.trial_config(sampled, annotation_key=ann.key, cache_dir=cache_dir, cpus=cpus)

        stopped_early: set[str] = set()
        optuna_storage = f"sqlite:///{storage / 'optuna.db'}"
        searcher = MultiStudySearcher(studies, make_config, optuna_storage, stopped_early)
        scheduler = PerStudyScheduler(studies, stopped_early)
        tuner = tune.Tuner(
            tune.with_resources(train_trial, {"cpu": cpus, "gpu": grid.resources.gpus_per_trial}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=total,
                max_concurrent_trials=grid.resources.max_concurrent_trials,
                reuse_actors=True,  # no new process (and torch import) per trial
            ),
            run_config=tune.RunConfig(
                name=f"{grid.experiment}-{grid_sig}",
                storage_path=str(storage / "ray_results"),
                callbacks=[callback, ConsoleProgress(total, lambda c: f"{c['method']} {trial_tags(c)['cell']}")],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=grid.max_retries),
                verbose=0,
            ),
        )
        result_grid = tuner.fit()
        table, rows = summarize(studies, optuna_storage)
        failed = [r for r in result_grid if r.error is not None]
        tracker.log_text(parent, table + "\n", "summary.md")
        tracker.set_tags(parent, {"trials_failed": str(len(failed)), "trials_run": str(len(result_grid))})
        print("\n" + table, flush=True)
        for r in failed:
            print(f"trial {r.config.get('study')} failed: {str(r.error).splitlines()[0][:300]}", file=sys.stderr)
        status = "KILLED" if callback.open_runs() else "FINISHED"
        return {
            "tracking_uri": grid.resolved_tracking_uri,
            "parent_run_id": parent,
            "rows": rows,
            "failed": len(failed),
            "interrupted": status == "KILLED",
            "results": [(r.config, r.metrics) for r in result_grid if r.config],
        }
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if searcher is not None:
            searcher.abandon_live()
        closed = callback.close_all("KILLED")
        closed += tracker.close_open_runs(parent, "KILLED")
        tracker.end_run(parent, status)
        print(
            f"\nresults: MLflow experiment {grid.experiment!r} (parent run {parent}, status {status}"
            + (f", {closed} unfinished trial runs marked KILLED" if closed else "")
            + f")\n  mlflow ui --backend-store-uri {grid.resolved_tracking_uri}\n"
            f"  optuna-dashboard sqlite:///{storage / 'optuna.db'}\n  ray results: {storage / 'ray_results'}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", type=Path, help="grid file (default: the embedded default grid)")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the plan, run nothing")
    args = parser.parse_args(argv)
    grid_path = args.grid or DEFAULT_GRID
    try:
        grid = load_grid(grid_path)
        if args.dry_run:
            studies = expand(grid)
            check_inputs(grid)
            for s in studies:
                print(f"{s.method.name:12s} {s.cell.label()}  ({s.method.search.num_samples} trials)")
            print(f"{len(studies)} studies, {sum(s.method.search.num_samples for s in studies)} trials; grid is valid")
            return 0
        summary = run(grid, grid_path)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is in MLflow and the Ray results directory", file=sys.stderr)
        return 130
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
