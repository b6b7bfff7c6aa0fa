"""MLflow tracking, all of it from the driver, in the run layout of :mod:`orchestrator.runs`.

A trial run gets the flattened resolved config as params, the per-epoch metrics (step = epoch),
its tags, ``resolved_config.json``, the rerun commands as its description and, once it finished,
``plots/*.png`` and the deployable ``student/`` model (:mod:`orchestrator.plots`,
:mod:`orchestrator.student`), made on a worker thread so that Tune's event loop never waits for
them. The results tables go on the parent run (:mod:`orchestrator.report`).

A resumed sweep reuses its parent run and reopens the runs of the trials it resumes (no duplicate
runs); :meth:`MlflowTrialCallback.on_checkpoint` records where each trial's latest checkpoint is.

Trials never talk to MLflow themselves: :class:`MlflowTrialCallback` logs what Tune reports, so a
trial that crashes, is killed or whose node is lost still ends with a final status (FAILED / KILLED)
set by the driver, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
from ray.tune import Callback

from orchestrator import runs
from orchestrator.faults import WriteError, write_problem
from orchestrator.plan import TrialSpecs
from orchestrator.student import log_trial_artifacts
from trainables.spec import CellSpec, TrialSpec
from trainables.common.diagnostics import collapse_reason

MAX_PARAM_LEN = 6000


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
    return out


class Tracker:
    """Thin wrapper over :class:`MlflowClient` with this project's run layout."""

    def __init__(
        self, tracking_uri: str, experiment: str, artifact_location: str | None = None, entry_point: str = "orchestrator.sweep"
    ):
        self.uri = tracking_uri
        with _quiet("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            self.client = MlflowClient(tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
        self.system_tags = runs.system_tags(entry_point)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            self.experiment_id = found.experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**self.system_tags, runs.RUN_NAME_TAG: name, **tags}
        if parent is not None:
            tags[runs.PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:MAX_PARAM_LEN]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_table(self, run_id: str, columns: dict[str, list[Any]], artifact_file: str) -> None:
        """A table in the format of ``MlflowClient.log_table`` (JSON ``split`` orientation, listed
        in the run's ``mlflow.loggedArtifacts`` tag, read back by ``mlflow.load_table``), replaced
        when logged again: ``log_table`` would append the rows to the earlier ones."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            pd.DataFrame(columns).to_json(path, orient="split", index=False)
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))
        listed = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in listed:
            self.set_tags(run_id, {MLFLOW_LOGGED_ARTIFACTS: json.dumps([*listed, entry])})

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def open_runs(self, parent: str) -> list[str]:
        found = self.client.search_runs([self.experiment_id], filter_string=runs.open_runs_filter(parent), max_results=5000)
        return [r.info.run_id for r in found]

    def find_runs(self, tags: dict[str, str], parent: str | None = None, max_results: int = 5000) -> list[Any]:
        """Runs of the experiment carrying all ``tags`` (and nested under ``parent``), newest first."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=runs.tag_filter(tags, parent), max_results=max_results,
            order_by=runs.NEWEST_FIRST,
        )

    def children(self, parent: str, kind: str | None = None) -> list[Any]:
        """Every run nested under ``parent`` (of one ``kind`` tag if given)."""
        return self.find_runs({runs.KIND: kind} if kind else {}, parent=parent)

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed sweep or trial continues logging into it)."""
        self.client.update_run(run_id, status="RUNNING")

    def close_open_runs(self, parent: str, status: str) -> int:
        """Give every still-RUNNING child of ``parent`` a final status. Returns how many."""
        ids = self.open_runs(parent)
        for run_id in ids:
            self.end_run(run_id, status)
        return len(ids)

    # Project-specific runs ---------------------------------------------------------------------

    def log_annotation_input(self, run_id: str, spec: TrialSpec) -> None:
        """The trial's annotation as an ``mlflow.data`` training input of its run (the run list's
        Dataset column): named by its cell, its digest the annotation cache key, its source the
        cache entry."""
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")  # a file path
        source = local(str(Path(spec.cache_dir) / spec.annotation_key))
        dataset = MetaDataset(source, name=runs.annotation_input_name(spec.cell), digest=spec.annotation_key[:36])
        context = InputTag("mlflow.data.context", "train")
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])

    def log_annotation(self, parent: str, annotation: Any, cell: CellSpec) -> str:
        tags = runs.annotation_tags(cell, annotation.key, annotation.cached)
        run_id = self.start_run(runs.annotation_run_name(tags), tags, parent)
        spec = cell.to_config()
        self.log_params(run_id, flatten({"annotator": spec["annotator"], "dataset": spec["dataset"]}))
        self.log_metrics(run_id, {f"{runs.ANNOTATION_PREFIX}{k}": v for k, v in annotation.stats.items()}, step=0)
        record = {"key": annotation.key, "stats": annotation.stats, "meta": annotation.meta}
        self.log_dict(run_id, record, runs.ANNOTATION_RECORD)
        self.end_run(run_id)
        return run_id


class MlflowTrialCallback(Callback):
    """Mirrors every Tune trial into a nested MLflow run under the sweep's parent run.

    A finished trial's run ends FINISHED at once; its plots and student are made by a worker thread
    (:class:`ArtifactWorker`), off Tune's event loop. :meth:`finish` waits for them.

    ``settle(trial_id)`` is called once a trial's run has its final status (FINISHED or FAILED):
    the sweep's searcher tells Optuna then, not before. A trial that failed because a write failed
    (disk full) is neither: the sweep stops with :class:`~orchestrator.faults.WriteError`."""

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        names: runs.RunNames = runs.RunNames(),
        settle: Callable[[str], None] | None = None,
    ):
        self.tracker = tracker
        self.settle = settle or (lambda trial_id: None)
        self.parent = parent_run_id
        self.names = names
        self.spec = TrialSpecs()
        self.runs: dict[str, str] = {}  # tune trial id -> mlflow run id
        self.logged_until: dict[str, int] = {}  # tune trial id -> last epoch already in MLflow
        self.history: dict[str, list[dict[str, float]]] = {}  # tune trial id -> reported metrics (plots)
        self.errors: dict[str, str] = {}
        self.artifacts = ArtifactWorker(tracker)

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        spec = self.spec(trial)
        if spec.mlflow_run_id:
            self.runs[trial.trial_id] = self._reopen(trial, spec.mlflow_run_id)
            return spec.mlflow_run_id
        tags = {runs.KIND: runs.TRIAL, runs.TUNE_TRIAL_ID: trial.trial_id, **runs.trial_tags(spec)}
        run_id = self.tracker.start_run(self.names(spec), tags, self.parent)
        config = spec.to_config()
        self.tracker.log_params(run_id, flatten({k: config[k] for k in ("method", "cell", "params", "training", "objective")}))
        self.tracker.log_dict(run_id, config, runs.RESOLVED_CONFIG)
        self.tracker.set_tags(run_id, {runs.NOTE_TAG: runs.describe_trial(spec, run_id, self.tracker.uri)})
        self.tracker.log_annotation_input(run_id, spec)
        self.runs[trial.trial_id] = run_id
        return run_id

    def _reopen(self, trial, run_id: str) -> str:
        # A trial of an interrupted sweep resumes into the run it started (no duplicate run);
        # epochs it logged after its last checkpoint are trained again but not logged twice.
        self.tracker.reopen_run(run_id)
        history = self.tracker.client.get_metric_history(run_id, runs.EPOCH)
        self.logged_until[trial.trial_id] = int(max((m.value for m in history), default=0))
        resumed = int(self.tracker.client.get_run(run_id).data.tags.get(runs.RESUMED, "0")) + 1
        self.tracker.set_tags(run_id, {runs.RESUMED: str(resumed), runs.TUNE_TRIAL_ID: trial.trial_id})
        return run_id

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        # Where a resumed sweep finds this trial's latest state (shared storage on a cluster).
        self.tracker.set_tags(self._run_for(trial), {runs.CHECKPOINT: checkpoint.path})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_for(trial)
        step = int(result.get(runs.EPOCH, result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if k.startswith(runs.REPORTED_PREFIXES) or k == runs.EPOCH}
        history = self.history.setdefault(trial.trial_id, [])
        history[:] = [h for h in history if h[runs.EPOCH] < step]  # a retried trial repeats epochs
        history.append({**metrics, runs.EPOCH: step})
        # A trial retried or resumed from its checkpoint trains again the epochs after it, which
        # may already be logged (a node lost between a result and its checkpoint): logged once.
        if step <= self.logged_until.get(trial.trial_id, 0):
            return
        self.tracker.log_metrics(run_id, metrics, step=step)
        self.logged_until[trial.trial_id] = step

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        _stop_on_write_error(trial)  # a retry would fail the same way, and count as a retry
        run_id = self._run_for(trial)
        retries = int(self.tracker.client.get_run(run_id).data.tags.get(runs.RETRIES, "0")) + 1
        self.tracker.set_tags(run_id, {runs.RETRIES: str(retries), runs.LAST_ERROR: _error_text(trial)})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_for(trial)
        last = trial.last_result or {}
        if runs.TEST_ACC in last:
            self.tracker.set_tags(run_id, {runs.FINAL_TEST_ACC: f"{last[runs.TEST_ACC]:.4f}"})
        if "diag/collapsed" in last:
            self.tracker.set_tags(run_id, {runs.COLLAPSE: collapse_reason(last)})
        self.tracker.end_run(run_id, "FINISHED")
        self.settle(trial.trial_id)
        self.artifacts.submit(run_id, self.spec(trial), self.history.pop(trial.trial_id, []), trial.checkpoint)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _stop_on_write_error(trial)  # not the trial's failure: it resumes once space is freed
        run_id = self._run_for(trial)
        error = _error_text(trial)
        self.errors[trial.trial_id] = error
        self.tracker.set_tags(run_id, {runs.ERROR: error[-5000:]})
        self.tracker.end_run(run_id, "FAILED")
        self.settle(trial.trial_id)

    def finish(self) -> int:
        """Wait until the plots and students of every finished trial are logged. Returns how many
        trials' artifacts could not be logged (tagged ``artifacts_error``; the sweep goes on)."""
        return self.artifacts.finish()

    def open_runs(self) -> list[str]:
        """Runs this callback opened that have no final status yet."""
        return [r for r in self.runs.values() if self.tracker.client.get_run(r).info.status == "RUNNING"]

    def close_all(self, status: str) -> int:
        """End every run this callback opened that is still RUNNING (driver interrupted)."""
        still_open = self.open_runs()
        for run_id in still_open:
            self.tracker.end_run(run_id, status)
        return len(still_open)


class ArtifactWorker:
    """Logs the plots and the student of finished trials on one background thread, in the order
    the trials finished. A failure is logged and tagged on the run, never raised."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.queue: queue.Queue = queue.Queue()
        self.failed = 0
        self.thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment (tuner.pkl): no queue or thread in there.
        return {"tracker": self.tracker, "failed": self.failed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracker"])
        self.failed = state["failed"]

    def submit(self, run_id: str, spec: TrialSpec, history: list[dict[str, float]], checkpoint: Any) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="trial-artifacts", daemon=True)
            self.thread.start()
        self.queue.put((run_id, spec, history, checkpoint))

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            run_id, spec, history, checkpoint = job
            try:
                log_trial_artifacts(self.tracker.client, run_id, spec, history, checkpoint)
            except Exception as err:  # plots and the student are extras: never fail the sweep over them
                self.failed += 1
                logging.getLogger(__name__).warning("run %s: plots / student not logged: %r", run_id, err)
                with contextlib.suppress(Exception):
                    self.tracker.set_tags(run_id, {runs.ARTIFACTS_ERROR: repr(err)[:5000]})

    def finish(self) -> int:
        """Wait for every submitted trial, stop the thread. Returns how many failed."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        return self.failed


@contextlib.contextmanager
def _quiet(*names: str):
    """Only warnings and errors from the loggers ``names`` while inside."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def _stop_on_write_error(trial) -> None:
    """Raise :class:`WriteError` when ``trial`` failed because a write failed (its checkpoint, or
    the driver's MLflow or Optuna writes while Tune ended it): the sweep stops, the trial's run and
    Optuna trial are left unfinished, and the same command resumes it once space is freed."""
    problem = write_problem(_error_text(trial))
    if problem is not None:
        raise WriteError(problem)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    if path and Path(path).exists():
        return Path(path).read_text()[-5000:]
    return str(getattr(trial, "error_msg", "") or "trial failed (no error file)")



class ConsoleProgress(Callback):
    """One line per finished or failed trial with the sweep's done / running / pending counts, and
    every ``every_s`` seconds while trials run, one line with each running trial's epoch."""

    def __init__(self, total: int, label_for: Any = runs.progress_label, every_s: float = 60.0):
        self.total = total
        self.label_for = label_for  # TrialSpec -> short description
        self.spec = TrialSpecs()
        self.every_s = every_s
        self.running: dict[str, str] = {}  # trial id -> "label epoch e/E"
        self.done = 0
        self.failed = 0
        self.last_status = time.monotonic()

    def _counts(self) -> str:
        pending = self.total - self.done - self.failed - len(self.running)
        return f"[trials {self.done} done, {self.failed} failed, {len(self.running)} running, {pending} pending]"

    def _line(self, trial, what: str) -> None:
        print(f"{self._counts()} {self.label_for(self.spec(trial))}: {what}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running[trial.trial_id] = f"{self.label_for(self.spec(trial))} starting"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        # A trial on a reused actor may report before any start event.
        spec = self.spec(trial)
        self.running[trial.trial_id] = f"{self.label_for(spec)} epoch {result.get(runs.EPOCH, '?')}/{spec.training.epochs}"
        now = time.monotonic()
        if now - self.last_status >= self.every_s:
            self.last_status = now
            print(f"{self._counts()} running: " + "; ".join(self.running.values()), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.pop(trial.trial_id, None)
        self.done += 1
        last = trial.last_result or {}
        keys = (runs.TEST_ACC, runs.TEST_ACC_SELECTED, self.spec(trial).objective)
        shown = ", ".join(f"{k}={runs.shown(k, last[k])}" for k in keys if k in last)
        self._line(trial, f"finished after {last.get(runs.EPOCH, '?')} epochs ({shown})")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.pop(trial.trial_id, None)
        self.failed += 1
        self._line(trial, "FAILED: " + _error_text(trial).strip().splitlines()[-1][:200])
