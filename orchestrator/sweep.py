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
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.config import ClipAnnotatorSpec, Grid, GridError, load_grid, signature
from orchestrator.plan import Cell, Study, expand

DEFAULT_GRID = Path(__file__).with_name("default_grid.yaml")
log = logging.getLogger("orchestrator.sweep")


def check_inputs(grid: Grid) -> dict[str, Any]:
    """Load every data set and check every annotator's model files before Ray starts.

    Returns the loaded data sets by spec (the annotation stage reuses them; one data set can be
    listed once per predefined split)."""
    from trainables.data.datasets import load_dataset

    problems, datasets = [], {}
    for i, spec in enumerate(grid.datasets):
        try:
            datasets[spec] = load_dataset(spec)
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
        for ds in datasets.values():
            if ann.class_names is not None and len(ann.class_names) != len(ds.class_names):
                problems.append(
                    f"annotators[{i}].class_names: {len(ann.class_names)} names but {ds.name} has "
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
            datasets[cell.dataset],
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
        if not tracker.find_runs({"kind": "annotation", "annotation_key": ann.key}, parent=parent, max_results=1):
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
        "label": config.get("label", config["method"]),
        "dataset": cell["dataset"]["name"],
        "annotator": cell["annotator"]["name"],
        "q": "" if cell["q"] is None else f"{cell['q']:g}",
        "eta": "" if cell["eta"] is None else f"{cell['eta']:g}",
        "shots": str(cell["shots"]),
        "fraction": f"{cell['unlabeled_fraction']:g}",
        "seed": str(cell["seed"]),
        "split": "" if cell["dataset"].get("split") is None else str(cell["dataset"]["split"]),
        "signature": config["signature"],
        "study": config["study"],
        "objective": config["objective"],
    }
    if "optuna_trial" in config:
        tags["optuna_trial"] = str(config["optuna_trial"])
    tags["cell"] = " ".join(
        [tags["dataset"], tags["annotator"]]
        + [f"{k}={tags[k]}" for k in ("q", "eta") if tags[k]]
        + [f"shots={tags['shots']}", f"frac={tags['fraction']}"]
        + ([f"split={tags['split']}"] if tags["split"] else [])
        + [f"seed={tags['seed']}"]
    )
    return tags


class SweepLockedError(GridError):
    """Another driver is running a sweep on the same storage directory."""


@contextlib.contextmanager
def storage_lock(storage: Path):
    """One driver per storage directory: two drivers would resume each other's running trials."""
    import fcntl

    storage.mkdir(parents=True, exist_ok=True)
    path = storage / ".sweep.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise SweepLockedError(
                f"another sweep is running on storage {storage} ({handle.read().strip() or 'unknown process'}); "
                "wait for it, or give this grid another storage:"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def find_sweep_run(tracker, grid_sig: str):
    """The parent run of an earlier sweep of the same grid (same experiment and grid signature)."""
    runs = tracker.find_runs({"kind": "sweep", "grid_signature": grid_sig}, max_results=1)
    return runs[0] if runs else None


def open_sweep_run(tracker, grid: Grid, grid_path: Path | None, grid_sig: str, resume: bool) -> tuple[str, bool]:
    """Reuse the parent run of an earlier sweep of this grid (so a resumed sweep adds no duplicate
    runs) or start a new one. Returns (run id, resumed)."""
    earlier = find_sweep_run(tracker, grid_sig)
    if earlier is None:
        if resume:
            raise GridError(
                f"--resume: no earlier sweep of experiment {grid.experiment!r} with this grid (signature "
                f"{grid_sig}) in {grid.resolved_tracking_uri}; run without --resume to start one"
            )
        parent = tracker.start_run(
            f"sweep {grid.experiment} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {"kind": "sweep", "grid_signature": grid_sig, "grid_file": str(grid_path or "")},
        )
        # Absolute storage: a rerun launched from another directory (a Ray job) finds the same files.
        tracker.log_dict(parent, {**grid.model_dump(mode="json"), "storage": str(grid.storage_path)}, "grid_resolved.json")
        if grid_path is not None:
            tracker.log_file(parent, grid_path)
        tracker.log_params(parent, {"grid_signature": grid_sig})
        return parent, False
    parent = earlier.info.run_id
    # Runs a killed driver left RUNNING get a final status now; the trials among them that resume
    # from their checkpoints are reopened when they start again.
    stale = tracker.close_open_runs(parent, "KILLED")
    tracker.reopen_run(parent)
    resumes = int(earlier.data.tags.get("resumes", "0")) + 1
    tracker.set_tags(parent, {"resumes": str(resumes)})
    print(
        f"resuming sweep run {parent} (started {time.strftime('%Y-%m-%d %H:%M', time.localtime(earlier.info.start_time / 1000))}, "
        f"previous status {earlier.info.status}" + (f", {stale} runs left RUNNING marked KILLED" if stale else "") + ")",
        flush=True,
    )
    return parent, True


def run(
    grid: Grid,
    grid_path: Path | None = None,
    *,
    resume: bool = False,
    trainable: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole sweep. Returns a dict with the tracking URI, parent run id, summary
    rows and the Tune results. ``trainable`` replaces the Tune function (tests inject faults)."""
    with storage_lock(grid.storage_path):
        return _run(grid, grid_path, resume=resume, trainable=trainable)


def connect_ray(grid: Grid) -> None:
    """Join the grid's cluster (``ray.address``), else the cluster this process was started in (a
    Ray job: ``RAY_ADDRESS`` is set), else start a local Ray with ``ray.num_cpus``."""
    import ray

    # Small trials checkpoint often; Tune's advice to checkpoint less is noise for them.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if grid.ray.address:
        ray.init(address=grid.ray.address, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=grid.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaces it with an immediate exit


def _run(grid: Grid, grid_path: Path | None, *, resume: bool, trainable: Callable | None) -> dict[str, Any]:
    from ray import tune

    from orchestrator import report
    from orchestrator.search import MultiStudySearcher, PerStudyScheduler
    from orchestrator.tracking import ConsoleProgress, MlflowTrialCallback, Tracker
    from trainables.loop import train_trial

    studies = expand(grid)
    datasets = check_inputs(grid)
    storage = grid.storage_path
    grid_sig = signature(grid.model_dump())
    tracker = Tracker(grid.resolved_tracking_uri, grid.experiment, artifact_location=grid.artifact_location)
    parent, resumed = open_sweep_run(tracker, grid, grid_path, grid_sig, resume)
    optuna_storage = f"sqlite:///{storage / 'optuna.db'}"
    cache_dir = str(storage / "annotations")
    cpus = grid.resources.cpus_per_trial
    annotations: dict[tuple, Any] = {}

    def make_config(study: Study, sampled: dict[str, Any], number: int, resuming: bool) -> dict[str, Any]:
        ann = annotations[study.cell.annotation_job]
        config = study.trial_config(sampled, annotation_key=ann.key, cache_dir=cache_dir, cpus=cpus)
        config["optuna_trial"] = number
        if resuming:
            earlier = tracker.find_runs({"kind": "trial", "study": study.study_id, "optuna_trial": str(number)}, max_results=1)
            if earlier:
                config["mlflow_run_id"] = earlier[0].info.run_id
                if "checkpoint" in earlier[0].data.tags:
                    config["resume_checkpoint"] = earlier[0].data.tags["checkpoint"]
        return config

    stopped_early: set[str] = set()
    searcher = MultiStudySearcher(studies, make_config, optuna_storage, stopped_early)
    to_resume = searcher.resumable()
    to_ask = max(searcher.remaining() - to_resume, 0)  # the budget counts interrupted trials too
    total = to_resume + to_ask
    print(
        f"experiment {grid.experiment!r}: {len({s.cell for s in studies})} cells x {len(grid.methods)} methods = "
        f"{len(studies)} studies, {sum(s.method.search.num_samples for s in studies)} trials"
        + (f" ({to_resume} interrupted trials resume from their checkpoints, {to_ask} still to run)" if resumed else "")
        + f"\n  storage:  {storage}\n  tracking: {grid.resolved_tracking_uri}",
        flush=True,
    )
    tracker.log_params(parent, {"num_studies": str(len(studies)), "num_trials": str(sum(s.method.search.num_samples for s in studies))})

    callback = MlflowTrialCallback(tracker, parent, trial_tags, describe=lambda c, r: describe_trial(c, r, grid.resolved_tracking_uri))
    status = "FAILED"
    try:
        connect_ray(grid)
        annotations.update(run_annotations(grid, studies, datasets, tracker, parent))
        results = []
        if total:
            scheduler = PerStudyScheduler(studies, stopped_early)
            tuner = tune.Tuner(
                tune.with_resources(trainable or train_trial, {"cpu": cpus, "gpu": grid.resources.gpus_per_trial}),
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
                    callbacks=[callback, ConsoleProgress(total, lambda c: "{label} {cell}".format(**trial_tags(c)))],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=grid.max_retries),
                    verbose=0,
                ),
            )
            results = list(tuner.fit())
        failed = [r for r in results if r.error is not None]
        tables = report.publish(tracker, parent)
        tracker.set_tags(parent, {"trials_failed": str(len(failed)), "trials_run": str(len(results))})
        print("\n" + tables.console(), flush=True)
        for r in failed:
            print(f"trial {r.config.get('study')} failed: {str(r.error).splitlines()[0][:300]}", file=sys.stderr)
        status = "KILLED" if callback.open_runs() else "FINISHED"
        return {
            "tracking_uri": grid.resolved_tracking_uri,
            "parent_run_id": parent,
            "rows": tables.rows,
            "tables": tables,
            "failed": len(failed),
            "interrupted": status == "KILLED",
            "resumed": resumed,
            "results": [(r.config, r.metrics) for r in results if r.config],
            "result_grid": results,
        }
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        searcher.abandon_live()
        closed = callback.close_all("KILLED")
        closed += tracker.close_open_runs(parent, "KILLED")
        tracker.end_run(parent, status)
        print(
            f"\nresults: MLflow experiment {grid.experiment!r} (parent run {parent}, status {status}"
            + (f", {closed} unfinished trial runs marked KILLED; run the same command again to resume them" if closed else "")
            + f")\n  mlflow ui --backend-store-uri {grid.resolved_tracking_uri}\n"
            f"  optuna-dashboard {optuna_storage}\n  ray results: {storage / 'ray_results'}",
            flush=True,
        )


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's preemption) stops the driver as Ctrl-C
    does: Tune ends its trials, their MLflow runs and the sweep's end ``KILLED``, and running the
    same command again resumes them."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def describe_trial(config: dict[str, Any], run_id: str, tracking_uri: str) -> str:
    """Markdown for a trial run's description in the MLflow UI: copyable rerun and ablation commands."""
    from trainables.registry import ALGORITHMS

    base = f"python -m orchestrator.rerun {run_id} --tracking-uri {tracking_uri}"
    lines = [
        f"**{config['method']}** on {trial_tags(config)['cell']} (signature `{config['signature']}`)",
        "",
        "Rerun this configuration:",
        "```",
        base,
        "```",
    ]
    ablations = ALGORITHMS[config["method"]].ablations
    if ablations:
        lines += ["", "Run each ablation of the method on this configuration:", "```"]
        lines += [f"{base} --ablation {name}" for name in ablations]
        lines += ["```"]
    lines += ["", "Other seeds or overrides: add `--seeds 0 1 2` or `--set training.lr=0.01 --set params.<name>=<value>`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", type=Path, help="grid file (default: the embedded default grid)")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the plan, run nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the earlier sweep of this grid (refused if there is none); running the same command "
        "again without it resumes too, or starts the sweep if it never ran",
    )
    args = parser.parse_args(argv)
    stop_on_sigterm()
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
        summary = run(grid, grid_path, resume=args.resume)
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
