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
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit


def arguments() -> argparse.ArgumentParser:
    """The command line. Built before the imports below (torch, scikit-learn, MLflow: seconds), so
    that ``--help`` and a mistyped option answer at once."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", nargs="?", type=Path, help="grid file (default: the embedded default grid)")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the plan, run nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the earlier sweep of this grid (refused if there is none); running the same command "
        "again without it resumes too, or starts the sweep if it never ran",
    )
    return parser


if __name__ == "__main__":
    arguments().parse_args()  # --help, or an unknown option: answered and exited here

from orchestrator import runs  # noqa: E402
from orchestrator.config import ClipAnnotatorSpec, Grid, GridError, VlmAnnotatorSpec, load_grid  # noqa: E402
from orchestrator.launch import annotate_cells, connect_ray, exit_code, run_trials  # noqa: E402
from orchestrator.plan import Study, dataset_specs, expand, method_training  # noqa: E402
from trainables.data.spec import signature  # noqa: E402
from trainables.spec import CHECKPOINT_FILE, TrialSpec  # noqa: E402

DEFAULT_GRID = Path(__file__).with_name("default_grid.yaml")


def storage_problems(storage: Path) -> list[str]:
    """Why ``storage`` cannot hold a sweep's files (empty: it can, or can be created)."""
    if storage.exists() and not storage.is_dir():
        return [f"storage: {storage} exists and is not a directory"]
    existing = next(p for p in (storage, *storage.parents) if p.exists())
    if not existing.is_dir():
        return [f"storage: {existing} is not a directory, so {storage} cannot be created"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"storage: {existing} is not writable by this user, so {storage} cannot be written"]
    return []


def check_inputs(grid: Grid) -> dict[str, Any]:
    """Load every data set, check that the grid's sizes fit them, that every annotator's model
    files are there and that ``storage`` can be written, before Ray starts.

    Returns the loaded data sets by spec (the annotation stage reuses them; one data set can be
    listed once per predefined split)."""
    from trainables.data.datasets import load_dataset

    problems, datasets = storage_problems(grid.storage_path), {}
    for i, spec in dataset_specs(grid):  # one per long-tailed ratio of the imbalance_ratio axis
        try:
            datasets[spec] = load_dataset(spec)
        except (FileNotFoundError, RuntimeError, OSError, ValueError) as err:
            problems.append(f"datasets[{i}] ({spec.name}): {err}")
    for where, ann in model_annotators(grid):
        if isinstance(ann, ClipAnnotatorSpec):
            problems += _clip_problems(where, ann, datasets.values())
        if isinstance(ann, VlmAnnotatorSpec):
            from orchestrator.annotation.vlm_check import vlm_problems

            problems += vlm_problems(where, ann, datasets.values())
    problems += _unlabeled_problems(grid, datasets) + _size_problems(grid, datasets) + service_problems(grid)
    if problems:
        raise GridError("inputs are not usable:\n  " + "\n  ".join(problems))
    return datasets


def model_annotators(grid: Grid) -> list[tuple[str, Any]]:
    """Every annotator that runs a model, with its key: CLIP and VLM entries, ensembles' members and
    the CLIP annotator an ``instance_dependent`` generator draws its confidences from."""
    out = []
    for i, ann in enumerate(grid.annotators):
        members = [(f"annotators[{i}].members[{j}]", m) for j, m in enumerate(ann.members)] if ann.kind == "ensemble" else []
        out += members or [(f"annotators[{i}]", ann)]
        if getattr(ann, "confidences", None) is not None:
            out.append((f"annotators[{i}].confidences", ann.confidences))
    return [(where, ann) for where, ann in out if isinstance(ann, (ClipAnnotatorSpec, VlmAnnotatorSpec))]


def checked_grid(path: Path) -> Grid:
    """The grid file, validated. Refused with every problem at once: when the schema refuses it,
    the data sets and the storage the file names are checked too, so that a missing data set is
    not reported only after a parameter error is fixed."""
    try:
        return load_grid(path)
    except GridError as err:
        extra = _raw_input_problems(path)
        if not extra:
            raise
        raise GridError("\n  ".join([str(err), "and its inputs:", *extra])) from None


def _raw_input_problems(path: Path) -> list[str]:
    """The problems :func:`check_inputs` finds in the data sets and storage of a grid file whose
    schema was refused (entries the schema refuses are left to its message). A data set installed
    with a dependency has no files to miss and is not loaded (scikit-learn takes seconds to import)."""
    from orchestrator.config import read_yaml
    from trainables.data.datasets import DATASETS, load_dataset
    from trainables.data.spec import DatasetSpec

    try:
        raw = read_yaml(path)
    except GridError:
        return []
    if not isinstance(raw, dict):
        return []
    problems = []
    if isinstance(raw.get("storage"), str):
        problems += storage_problems(Path(raw["storage"]).expanduser())
    for i, entry in enumerate(raw.get("datasets") or []):
        try:
            spec = DatasetSpec(**entry)
        except Exception:  # noqa: BLE001 - the schema's message names it
            continue
        if DATASETS[spec.name].bundled:
            continue
        try:
            load_dataset(spec)
        except (FileNotFoundError, RuntimeError, OSError, ValueError) as err:
            problems.append(f"datasets[{i}] ({spec.name}): {err}")
    return problems


def _clip_problems(where: str, ann: ClipAnnotatorSpec, datasets: Any) -> list[str]:
    """The CLIP annotator's model config, model name, checkpoint file and class names."""
    problems = []
    if ann.model_config_path is not None and not Path(ann.model_config_path).is_file():
        problems.append(f"{where}.model_config_path: no such file {ann.model_config_path}")
    elif ann.model_config_path is None:
        import open_clip

        if ann.model not in open_clip.list_models():
            problems.append(
                f"{where}.model: open_clip has no model {ann.model!r} (see open_clip.list_models(), or give model_config_path)"
            )
    pretrained = ann.pretrained or ""
    if ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))) and not (
        Path(pretrained).exists() or pretrained.startswith("hf-hub:")
    ):
        problems.append(f"{where}.pretrained: no such checkpoint file {pretrained}")
    for ds in datasets:
        if ann.class_names is not None and len(ann.class_names) != len(ds.class_names):
            problems.append(f"{where}.class_names: {len(ann.class_names)} names but {ds.name} has {len(ds.class_names)} classes")
    if not problems:
        from orchestrator.annotation.clip_check import weights_and_tokenizer_problems

        problems += weights_and_tokenizer_problems(where, ann)
    return problems


PROBE_TIMEOUT_S = 5.0


def _unreachable(host: str, port: int) -> str | None:
    """Why nothing answers a TCP connection to ``host:port`` within the probe's timeout (None: it does)."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} within {PROBE_TIMEOUT_S:g} s ({type(err).__name__}: {err})"
    return None


def service_problems(grid: Grid) -> list[str]:
    """The tracking server and the Ray cluster the grid names, probed with a short timeout (a
    client would otherwise retry for minutes before failing with a misleading message)."""
    problems = []
    uri = urlsplit(grid.tracking_uri or "")
    if uri.scheme in ("http", "https") and uri.hostname:
        reason = _unreachable(uri.hostname, uri.port or (443 if uri.scheme == "https" else 80))
        if reason:
            problems.append(f"tracking_uri: {reason}; start the MLflow server, or fix the address")
    address = grid.ray.address
    if address and address != "auto":
        hostport = urlsplit(address if "://" in address else f"ray://{address}")
        if hostport.hostname and hostport.port:
            reason = _unreachable(hostport.hostname, hostport.port)
            if reason:
                problems.append(f"ray.address: {reason}; start the cluster (ray up / ray start --head), or use auto")
    return problems


def _unlabeled_problems(grid: Grid, datasets: dict[Any, Any]) -> list[str]:
    """A flat folder of unlabeled images: only a VLM annotator can label it (synthetic sets are drawn
    from true labels); its trials report label-free metrics only."""
    problems = []
    for i, spec in dataset_specs(grid):
        ds = datasets.get(spec)
        if ds is None or ds.labeled:
            continue
        for j, ann in enumerate(grid.annotators):
            if ann.kind in ("synthetic", "given"):
                problems.append(
                    f"annotators[{j}] ({ann.name!r}, kind {ann.kind}): datasets[{i}] ({spec.display}) is a flat folder of "
                    f"unlabeled images; only a VLM annotator (kind clip) can annotate it"
                )
    return problems


def _size_problems(grid: Grid, datasets: dict[Any, Any]) -> list[str]:
    """Sizes the data cannot meet: more revealed shots than a class has, a batch larger than the
    training pool (a method that drops the last partial batch would never take a step)."""
    import numpy as np

    problems = []
    for spec, ds in datasets.items():
        name = spec.display if spec.split is None else f"{spec.display} (split {spec.split})"
        fewest = int(np.bincount(ds.train_y, minlength=len(ds.class_names)).min()) if ds.labeled else 0
        for shots in grid.grid.shots:
            if shots > fewest:
                problems.append(
                    f"grid.shots: {shots} exceeds the {fewest} training samples of {name}'s smallest class"
                    if ds.labeled else f"grid.shots: {shots} shots asked but {name} has no labels to reveal (a flat image folder)"
                )
        for i, method in enumerate(grid.methods):
            training = method_training(grid, method)
            pool = int(len(ds.train_y) * (1 - training.val_fraction))
            if training.batch_size > pool:
                problems.append(
                    f"methods[{i}] ({method.label or method.name}): training.batch_size {training.batch_size} exceeds "
                    f"the {pool} training samples of {name} (after the {training.val_fraction:g} validation split)"
                )
    return problems


def checked_checkpoint(tag: str | None, storage: Path) -> str | None:
    """The checkpoint directory a trial run's ``checkpoint`` tag names, if it lies inside this
    sweep's Tune results; None otherwise. Anyone who can write to the tracking server can set the
    tag: a path elsewhere is ignored (the trial restarts from scratch), with a warning."""
    if not tag:
        return None
    root = (storage / "ray_results").resolve()
    path = Path(tag).resolve()
    if not path.is_relative_to(root):
        print(f"warning: ignoring the checkpoint {tag} of a trial run: it is outside {root}; the trial restarts", flush=True)
        return None
    return str(path)


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
    found = tracker.find_runs({runs.KIND: runs.SWEEP, runs.GRID_SIGNATURE: grid_sig}, max_results=1)
    return found[0] if found else None


def log_grid_file(tracker, parent: str, grid_path: Path, tracking_uri: str | None) -> None:
    """The grid file as an artifact of the sweep run, with the tracking URI's credentials removed."""
    text = grid_path.read_text()
    if tracking_uri is None or runs.redact(tracking_uri) == tracking_uri or tracking_uri not in text:
        tracker.log_file(parent, grid_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / grid_path.name
        copy.write_text(text.replace(tracking_uri, runs.redact(tracking_uri)))
        tracker.log_file(parent, copy)


def machine() -> str:
    """``Intel(R) Xeon(R) ... x 2 CPUs, no GPU``: the driver's machine (a local sweep's trials run
    there too; on a cluster, its head node)."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return f"{model} x {os.cpu_count()} CPUs, " + (", ".join(gpus) if gpus else "no GPU")


def open_sweep_run(tracker, grid: Grid, grid_path: Path | None, grid_sig: str, resume: bool) -> tuple[str, bool]:
    """Reuse the parent run of an earlier sweep of this grid (so a resumed sweep adds no duplicate
    runs) or start a new one. Returns (run id, resumed)."""
    earlier = find_sweep_run(tracker, grid_sig)
    if earlier is None:
        if resume:
            raise GridError(
                f"--resume: no earlier sweep of experiment {grid.experiment!r} with this grid (signature "
                f"{grid_sig}) in {runs.redact(grid.resolved_tracking_uri)}; run without --resume to start one"
            )
        parent = tracker.start_run(
            runs.sweep_run_name(grid.experiment, time.strftime("%Y-%m-%d %H:%M:%S")),
            {**runs.sweep_tags(grid_sig, str(grid_path or "")), runs.MACHINE: machine()},
        )
        # Absolute storage: a rerun launched from another directory (a Ray job) finds the same files.
        resolved = {**grid.model_dump(mode="json"), "storage": str(grid.storage_path)}
        if grid.tracking_uri is not None:
            resolved["tracking_uri"] = runs.redact(grid.tracking_uri)
        tracker.log_dict(parent, resolved, runs.GRID_RESOLVED)
        if grid_path is not None:
            log_grid_file(tracker, parent, grid_path, grid.tracking_uri)
        tracker.log_params(parent, {runs.GRID_SIGNATURE: grid_sig})
        return parent, False
    parent = earlier.info.run_id
    # Runs a killed driver left RUNNING get a final status now; the trials among them that resume
    # from their checkpoints are reopened when they start again.
    stale = tracker.close_open_runs(parent, "KILLED")
    tracker.reopen_run(parent)
    resumes = int(earlier.data.tags.get(runs.RESUMES, "0")) + 1
    tracker.set_tags(parent, {runs.RESUMES: str(resumes)})
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
    datasets = check_inputs(grid)  # before the lock: a bad input writes nothing
    with storage_lock(grid.storage_path):
        connect_ray(grid)
        check_resources(grid)  # before the sweep's MLflow run: a request Ray can never meet would hang
        return Sweep(grid, grid_path, resume, datasets).run(trainable)


def resource_problems(grid: Grid, total: dict[str, float], nodes: list[dict[str, float]] | None = None) -> list[str]:
    """Requests of the grid that ``total`` (the cluster's resources) can never meet, and, given the
    resources of each node (``nodes``), those the cluster has in all but no single node has: a
    trial, or an annotation actor, runs on one node."""
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    requests = [("resources", "_per_trial", "one trial", grid.resources.cpus_per_trial, grid.resources.gpus_per_trial)]
    requests += [(where, "_per_actor", "one actor", ann.cpus_per_actor, ann.gpus_per_actor) for where, ann in model_annotators(grid)]
    problems = []
    for where, suffix, what, cpu_ask, gpu_ask in requests:
        beyond = [f"{where}.{kind}{suffix}: {asked:g} {unit} asked, the Ray cluster has {have:g}"
                  for kind, asked, have, unit in (("cpus", cpu_ask, cpus, "CPUs"), ("gpus", gpu_ask, gpus, "GPUs"))
                  if asked > have]  # fmt: skip
        problems += beyond or _no_node_problems(f"{where}.", suffix, what, cpu_ask, gpu_ask, nodes or [])
    return problems


def _no_node_problems(where: str, suffix: str, what: str, cpu_ask: float, gpu_ask: float, nodes: list[dict[str, float]]) -> list[str]:
    """The request of ``what`` (CPUs and GPUs together) if no node of ``nodes`` can hold it."""
    if not nodes or any(n.get("CPU", 0.0) >= cpu_ask and n.get("GPU", 0.0) >= gpu_ask for n in nodes):
        return []
    keys = f"{where}cpus{suffix}" + (f" and gpus{suffix}" if gpu_ask else "")
    asked = f"{cpu_ask:g} CPUs" + (f" and {gpu_ask:g} GPUs" if gpu_ask else "")
    if gpu_ask:
        has = ", ".join(f"{n.get('CPU', 0.0):g} CPUs + {n.get('GPU', 0.0):g} GPUs" for n in nodes)
    else:
        has = ", ".join(f"{n.get('CPU', 0.0):g}" for n in nodes) + f" CPUs, {sum(n.get('CPU', 0.0) for n in nodes):g} in all"
    return [
        f"{keys}: {asked} asked for {what}, which runs on a single node, and no node of the Ray cluster has that "
        f"much (its {len(nodes)} nodes have {has}); ask for at most what one node has"
    ]


def check_resources(grid: Grid) -> None:
    """Refuse what the Ray cluster can never schedule (Tune would wait forever, silently). A local
    Ray is all there is: refused; a cluster may still grow (autoscaling): warned."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = resource_problems(grid, ray.cluster_resources(), nodes)
    if problems and not grid.ray.address and not os.environ.get("RAY_ADDRESS"):
        raise GridError("resources the local Ray cannot provide:\n  " + "\n  ".join(problems))
    for line in problems:
        print(f"warning: {line} now (an autoscaling cluster may add nodes; else the trials wait)", flush=True)


class Sweep:
    """One driver's pass over a grid: its studies, its MLflow parent run and its annotations."""

    def __init__(self, grid: Grid, grid_path: Path | None, resume: bool, datasets: dict[Any, Any]):
        from orchestrator.tracking import Tracker

        self.grid = grid
        self.studies = expand(grid)
        self.datasets = datasets
        self.grid_sig = signature(grid.model_dump())
        self.tracker = Tracker(grid.resolved_tracking_uri, grid.experiment, artifact_location=grid.artifact_location)
        self.parent, self.resumed = open_sweep_run(self.tracker, grid, grid_path, self.grid_sig, resume)
        view = runs.run_list_view(s.objective for s in self.studies)
        self.tracker.client.set_experiment_tag(self.tracker.experiment_id, runs.VIEW_STATE_TAG, json.dumps(view))
        self.optuna_storage = f"sqlite:///{grid.storage_path / 'optuna.db'}"
        self.cache_dir = grid.storage_path / "annotations"
        self.annotations: dict[tuple, Any] = {}
        self.status = "FAILED"

    def trial_spec(self, study: Study, sampled: dict[str, Any], number: int, resuming: bool) -> TrialSpec:
        """The spec of Optuna trial ``number`` of ``study``; a trial an interrupted sweep left
        unfinished continues in its MLflow run, from its last checkpoint."""
        extra: dict[str, Any] = {"optuna_trial": number}
        if resuming:
            trial = {runs.KIND: runs.TRIAL, runs.STUDY: study.study_id, runs.OPTUNA_TRIAL: str(number)}
            earlier = self.tracker.find_runs(trial, max_results=1)
            if earlier:
                run_id = earlier[0].info.run_id
                checkpoint = checked_checkpoint(earlier[0].data.tags.get(runs.CHECKPOINT), self.grid.storage_path)
                if checkpoint is not None and not (Path(checkpoint) / CHECKPOINT_FILE).is_file():
                    note = f"checkpoint {checkpoint} is gone; the trial restarts from its first epoch"
                    print(f"warning: {study.study_id} trial {number}: {note}", flush=True)
                    self.tracker.set_tags(run_id, {runs.RESTARTED: note})
                    checkpoint = None
                extra.update(mlflow_run_id=run_id, resume_checkpoint=checkpoint)
        ann = self.annotations[study.cell.annotation_job]
        cpus = self.grid.resources.cpus_per_trial
        return study.trial_config(sampled, annotation_key=ann.key, cache_dir=str(self.cache_dir), cpus=cpus, **extra)

    def run(self, trainable: Callable | None) -> dict[str, Any]:
        from orchestrator.search import MultiStudySearcher, PerStudyScheduler
        from orchestrator.tracking import MlflowTrialCallback

        stopped_early: set[str] = set()
        searcher = MultiStudySearcher(self.studies, self.trial_spec, self.optuna_storage, stopped_early, tracked=True)
        to_resume = searcher.resumable()
        to_ask = max(searcher.remaining() - to_resume, 0)  # the budget counts interrupted trials too
        self._announce(to_resume, to_ask)
        callback = MlflowTrialCallback(self.tracker, self.parent, self.run_names(), settle=searcher.settle)
        try:
            cells = [s.cell for s in self.studies]
            self.annotations.update(annotate_cells(cells, self.datasets, self.cache_dir, self.tracker, self.parent))
            results = []
            if to_resume + to_ask:
                scheduler = PerStudyScheduler(self.studies, stopped_early)
                results = run_trials(
                    self.grid, name=f"{self.grid.experiment}-{self.grid_sig}", searcher=searcher, scheduler=scheduler,
                    num_samples=to_resume + to_ask, callback=callback, trainable=trainable,
                )  # fmt: skip
            return self._summary(results, callback)
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        finally:
            self._stop(searcher, callback)

    def run_names(self) -> runs.RunNames:
        """Trial runs named by the cell axes that vary in this sweep (``coreg q=0.3 eta=0.1 s0``)."""
        several = frozenset(s.study_id for s in self.studies if s.method.search.num_samples > 1)
        return runs.RunNames(runs.varying_axes(s.cell.spec() for s in self.studies), several)

    def _announce(self, to_resume: int, to_ask: int) -> None:
        grid, studies = self.grid, self.studies
        trials = sum(s.method.search.num_samples for s in studies)
        print(
            f"experiment {grid.experiment!r}: {len({s.cell for s in studies})} cells x {len(grid.methods)} methods = "
            f"{len(studies)} studies, {trials} trials"
            + (f" ({to_resume} interrupted trials resume from their checkpoints, {to_ask} still to run)" if self.resumed else "")
            + f"\n  storage:  {grid.storage_path}\n  tracking: {runs.redact(grid.resolved_tracking_uri)}",
            flush=True,
        )
        self.tracker.log_params(self.parent, {"num_studies": str(len(studies)), "num_trials": str(trials)})

    def _summary(self, results: list[Any], callback: Any) -> dict[str, Any]:
        from orchestrator import report

        failed = [r for r in results if r.error is not None]
        tables = report.publish(self.tracker, self.parent)
        self.tracker.set_tags(self.parent, {runs.TRIALS_FAILED: str(len(failed)), runs.TRIALS_RUN: str(len(results))})
        print("\n" + tables.console(), flush=True)
        for r in failed:
            study = TrialSpec.from_config(r.config).study if r.config else "?"
            print(f"trial {study} failed: {str(r.error).splitlines()[0][:300]}", file=sys.stderr)
        self.status = "KILLED" if callback.open_runs() else "FINISHED"
        return {
            "tracking_uri": self.grid.resolved_tracking_uri,
            "parent_run_id": self.parent,
            "rows": tables.rows,
            "tables": tables,
            "failed": len(failed),
            "interrupted": self.status == "KILLED",
            "resumed": self.resumed,
            "results": [(r.config, r.metrics) for r in results if r.config],
            "result_grid": results,
        }

    def _stop(self, searcher: Any, callback: Any) -> None:
        """Leave unfinished trials resumable and give every run a final status. With the disk full
        these writes fail too: each is tried, the runs they could not close are closed by the next
        run of the grid, and the write error is raised (the first one)."""
        from orchestrator.faults import write_problem

        failed: list[Exception] = []
        for step in (searcher.abandon_live, lambda: self._close(callback)):
            try:
                step()
            except Exception as err:
                if write_problem(err) is None:
                    raise
                failed.append(err)
        if failed:
            raise failed[0]

    def _close(self, callback: Any) -> None:
        """Final statuses for every run still open, and where the results are."""
        closed = callback.close_all("KILLED")
        closed += self.tracker.close_open_runs(self.parent, "KILLED")
        self.tracker.end_run(self.parent, self.status)
        print(
            f"\nresults: MLflow experiment {self.grid.experiment!r} (parent run {self.parent}, status {self.status}"
            + (f", {closed} unfinished trial runs marked KILLED; run the same command again to resume them" if closed else "")
            + f")\n  mlflow ui --backend-store-uri {runs.redact(self.grid.resolved_tracking_uri)}\n"
            f"  run list: {runs.run_list_url(runs.ui_address(self.grid.resolved_tracking_uri), self.tracker.experiment_id)}\n"
            f"  optuna-dashboard {self.optuna_storage}\n  ray results: {self.grid.storage_path / 'ray_results'}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    grid_path = args.grid or DEFAULT_GRID

    def work() -> dict[str, Any] | None:
        grid = checked_grid(grid_path)
        if not args.dry_run:
            return run(grid, grid_path, resume=args.resume)
        studies = expand(grid)
        check_inputs(grid)
        for where, ann in model_annotators(grid):
            if isinstance(ann, VlmAnnotatorSpec):
                from orchestrator.annotation.vlm_check import engine_line

                print(engine_line(where, ann))
        for s in studies:
            print(f"{s.method.name:12s} {s.cell.label()}  ({s.method.search.num_samples} trials)")
        print(f"{len(studies)} studies, {sum(s.method.search.num_samples for s in studies)} trials; grid is valid")
        return None

    return exit_code(work, "interrupted: finished work is in MLflow and the Ray results directory")

if __name__ == "__main__":
    sys.exit(main())
