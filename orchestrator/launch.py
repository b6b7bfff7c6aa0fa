"""Launching trials, shared by the sweep and reruns: join Ray, annotate the cells the trials need,
set up the Tuner (searcher, scheduler, callbacks, run config, storage) and run it.

The sweep (:mod:`orchestrator.sweep`) hands :func:`run_trials` its multi-study Optuna searcher and
per-study scheduler; a rerun (:mod:`orchestrator.rerun`) a fixed list of trial specs. Both mirror
their trials into MLflow with the same callback, which logs plots and students after each trial
on a worker thread: :func:`run_trials` returns once they are all logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from orchestrator import runs
from orchestrator.config import Grid, GridError
from orchestrator.plan import Cell


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's preemption) stops the driver as Ctrl-C
    does: Tune ends its trials, their MLflow runs and the sweep's end ``KILLED``, and running the
    same command again resumes them."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def exit_code(work: Callable[[], dict[str, Any] | None], interrupted: str) -> int:
    """Run a driver's command (``work``) the command-line way: SIGTERM stops it like Ctrl-C, and
    the exit code is 2 for a bad grid or argument, 130 when interrupted, 1 when trials failed or a
    write failed (disk full: one message, no traceback; the same command resumes once space is freed)."""
    from orchestrator.faults import quiet_write_errors, write_error_message, write_problem

    stop_on_sigterm()
    quiet_write_errors()
    # MLflow's download bars ("Downloading artifacts: 100%|...") for a resolved config or a table.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        out = work() or {}
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as err:
        problem = write_problem(err)
        if problem is None:
            raise
        print(f"error: {write_error_message(problem)}", file=sys.stderr)
        return 1
    if out.get("interrupted"):
        return 130
    return 1 if out.get("failed") else 0


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
        # A Ray this process starts and owns: its token-authentication notice ("set RAY_AUTH_MODE
        # to opt out") and "Started a local Ray instance" say nothing the user can act on.
        # address="local": a new Ray of its own, never the latest cluster another process started
        # on this machine (which plain ray.init() joins, and whose owner may stop it mid-sweep).
        with _quiet_loggers(*RAY_START_LOGGERS):
            ray.init(address="local", num_cpus=grid.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaces it with an immediate exit


RAY_START_LOGGERS = ("ray._private.worker", "ray._private.authentication.authentication_token_setup")


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.ERROR):
    """Only errors from the loggers ``names`` while inside."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def quiet_tune() -> None:
    """The console shows the project's lines: Tune's boxed configuration (internal class names)
    and its TensorBoard hint (not installed) come from its new console output, which ``verbose=0``
    does not turn off (the legacy one does); its "wrote the result files" line is info."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)


def annotate_cells(
    cells: Iterable[Cell], datasets: dict[Any, Any], cache_dir: Path, tracker=None, parent: str | None = None
) -> dict[tuple, Any]:
    """Annotate (or load from the cache) every distinct annotation the cells need, keyed by
    :attr:`Cell.annotation_job`. ``datasets``: the loaded data sets by spec. With a ``tracker``,
    each annotation gets its run under ``parent`` (once)."""
    from orchestrator.annotation.stage import annotate

    jobs: dict[tuple, Cell] = {}
    for cell in cells:
        jobs.setdefault(cell.annotation_job, cell)
    annotations = {}
    for n, (job, cell) in enumerate(jobs.items(), 1):
        tic = time.perf_counter()
        prefix = f"[annotate {n}/{len(jobs)}]"
        ann = annotate(
            datasets[cell.dataset],
            cell.annotator,
            q=cell.q,
            eta=cell.eta,
            seed=cell.seed,
            cache_dir=cache_dir,
            progress=_progress_printer(f"{prefix} {cell.dataset.display} {cell.annotator.name}"),
        )
        annotations[job] = ann
        known = {runs.KIND: runs.ANNOTATION, runs.ANNOTATION_KEY: ann.key}
        if tracker is not None and not tracker.find_runs(known, parent=parent, max_results=1):
            tracker.log_annotation(parent, ann, cell.spec())
        stats = ", ".join(
            f"{k}={v:.2f}" if k == "mean_set_size" else f"{k}={100 * v:.2f}%"
            for k, v in ann.stats.items()
            if k in ("partial_acc", "mean_set_size", "zs_acc_test")
        )
        source = "cache" if ann.cached else f"{time.perf_counter() - tic:.1f}s"
        print(f"{prefix} {cell.label(with_seed=cell.annotator.kind == 'synthetic')}: {stats} ({source})", flush=True)
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


def run_trials(
    grid: Grid,
    *,
    name: str,
    searcher: Any,
    num_samples: int,
    callback: Any,
    scheduler: Any = None,
    trainable: Callable[[dict[str, Any]], None] | None = None,
) -> list[Any]:
    """Run ``num_samples`` trials from ``searcher`` through Ray Tune with the grid's resources,
    storage and retries; ``callback`` (an :class:`~orchestrator.tracking.MlflowTrialCallback`)
    mirrors them into MLflow. Returns Tune's results once every trial's artifacts are logged."""
    from ray import tune

    from orchestrator.tracking import ConsoleProgress
    from trainables.loop import train_trial

    quiet_tune()
    resources = grid.resources
    tuner = tune.Tuner(
        tune.with_resources(trainable or train_trial, {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial}),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=resources.max_concurrent_trials,
            reuse_actors=True,  # no new process (and torch import) per trial
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(grid.storage_path / "ray_results"),
            callbacks=[callback, ConsoleProgress(num_samples, label_for=callback.names)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=grid.max_retries),
            verbose=0,
        ),
    )
    try:
        return list(tuner.fit())
    finally:
        callback.finish()
