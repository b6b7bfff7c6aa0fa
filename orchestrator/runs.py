"""The run layout in MLflow: every tag, metric name, run name, label and search filter the driver
writes or queries, in one place (tracking, reports, reruns and the rerun page import them).

Layout of a sweep (experiment = grid ``experiment``):

- one parent run per sweep (``kind=sweep``, ``grid_signature``), holding the grid file, the
  resolved grid (``grid_resolved.json``) and the results tables;
- a nested run per annotation (``kind=annotation``, ``annotation_key`` and the cell's tags) with
  its statistics as ``annotation/<stat>`` metrics;
- a nested run per Tune trial (``kind=trial``) tagged with its cell, method, row label, signature,
  study and objective (reruns also ``rerun_of`` and ``variant``), its metrics under
  :data:`REPORTED_PREFIXES` (step = epoch) and ``resolved_config.json``, named short by
  :class:`RunNames` (``coreg q=0.3 eta=0.1 s0``: only the cell axes that vary in the sweep);
- once the tables are built, the parent run's summary metrics (:func:`summary_metric`, one per
  column x row x statistic) and two tags on the trial runs: ``best_in_cell`` (the run a study's
  label-free objective chose, one per row, cell and seed) and ``cell_winner`` (the chosen runs of
  the row with the best mean selected test accuracy of its column);
- every run carries MLflow's system tags (:func:`system_tags`: user, entry point, git commit of the
  project), and the experiment a saved run-list view (:func:`run_list_view`) whose columns are
  the results.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # the rerun page imports this module without torch
    from trainables.spec import CellSpec, TrialSpec

# MLflow's own tags (``mlflow.utils.mlflow_tags``), spelled out: importing mlflow takes seconds,
# and the grid is validated through this module before anything is logged.
PARENT_TAG = MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
RUN_NAME_TAG = MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_USER, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE = "mlflow.user", "mlflow.source.name", "mlflow.source.type"
MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY = "mlflow.source.git.commit", "mlflow.source.git.dirty"
MLFLOW_PROJECT_ENTRY_POINT = "mlflow.project.entryPoint"
NOTE_TAG = "mlflow.note.content"
"""The run's description in the MLflow UI (the rerun commands)."""

KIND = "kind"
SWEEP, TRIAL, ANNOTATION = "sweep", "trial", "annotation"

# Tags of a sweep run
GRID_SIGNATURE, GRID_FILE, RESUMES = "grid_signature", "grid_file", "resumes"
TRIALS_FAILED, TRIALS_RUN = "trials_failed", "trials_run"
MACHINE = "machine"
"""What the sweep's driver ran on: CPU model and count, GPUs (README tables cite it)."""
# Tags of a trial run (besides the cell's and :func:`trial_tags`)
TUNE_TRIAL_ID, CHECKPOINT, RESUMED, RETRIES = "tune_trial_id", "checkpoint", "resumed", "retries"
RESTARTED = "restarted"
"""Why a resumed trial started again from its first epoch (its checkpoint was gone)."""
ERROR, LAST_ERROR, ARTIFACTS_ERROR = "error", "last_error", "artifacts_error"
FINAL_TEST_ACC = "final_test_acc"
BEST_IN_CELL = "best_in_cell"
"""``true`` on the run the study's label-free objective chose among the trials of one row, cell and
seed (every study has one: it says which hyperparameters won, not which method)."""
CELL_WINNER = "cell_winner"
"""``true`` on the chosen runs of the row with the best mean selected test accuracy of their
column (the method that wins the cell; reporting only, never a training decision)."""
STUDENT_KB = "student_kb"
"""Size in KiB of the trial's deployable student (``orchestrator.student.STUDENT_SIZE_TAG``, which
that file spells out itself: it runs inside the logged model, without this package)."""
COLLAPSE = "collapse"
"""Label-free collapse found at the last epoch: ``none``, ``predictions``, ``embedding`` (``trainables/common/diagnostics.py``)."""
METHOD, LABEL, VARIANT, RERUN_OF = "method", "label", "variant", "rerun_of"
STUDY, OPTUNA_TRIAL, OBJECTIVE, SIGNATURE, CELL = "study", "optuna_trial", "objective", "signature", "cell"
# Tags of an annotation run
ANNOTATION_KEY, CACHED = "annotation_key", "cached"

CELL_AXES = ("dataset", "annotator", "q", "eta", "shots", "fraction")
"""The cell tags that make a results column (the seed and split are replicates)."""
SEED, SPLIT = "seed", "split"

# Metrics
REPORTED_PREFIXES = ("train/", "test/", "val/", "pl/", "split/", "time/", "diag/")
"""Prefixes of the trial metrics mirrored into MLflow (everything else Tune reports is not)."""
EPOCH = "epoch"
TEST_ACC, TEST_ACC_SELECTED = "test/acc", "test/acc_selected"
ANNOTATION_PREFIX = "annotation/"
ZS_ACC, ZS_ACC_AVG = "annotation/zs_acc_test", "annotation/zs_acc_avg_test"
"""The VLM annotator's zero-shot test accuracy: single template, and the template average."""

# Artifacts
RESOLVED_CONFIG, GRID_RESOLVED, ANNOTATION_RECORD = "resolved_config.json", "grid_resolved.json", "annotation.json"
RESULTS_MD, RESULTS_CSV, RESULTS_HTML = "tables/results.md", "tables/results.csv", "tables/results.html"
ANNOTATIONS_CSV = "tables/annotations.csv"
RESULTS_TABLE = "tables/results.json"
"""The results as an MLflow table (``mlflow.log_table``; ``mlflow.load_table`` reads it back)."""
# Params of an annotation run (flattened annotator spec)
ANNOTATOR_KIND_PARAM = "annotator.kind"


def _axis(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def cell_tags(cell: CellSpec) -> dict[str, str]:
    """The cell's axes as tag values (``""`` for an axis the annotator does not have)."""
    split = cell.dataset.split
    return {
        "dataset": cell.dataset.display,
        "annotator": cell.annotator_name,
        "q": _axis(cell.q),
        "eta": _axis(cell.eta),
        "shots": str(cell.shots),
        "fraction": f"{cell.unlabeled_fraction:g}",
        SEED: str(cell.seed),
        SPLIT: "" if split is None else str(split),
    }


def cell_label(cell: CellSpec, *, with_seed: bool = True, every_axis: bool = False) -> str:
    """``digits flip q=0.3 eta=0.3 seed=0``. ``every_axis``: also ``shots=0 frac=1`` (the trial
    runs' ``cell`` tag, figure titles); else only the axes off their defaults (console, studies)."""
    tags = cell_tags(cell)
    parts = [tags["dataset"], tags["annotator"]] + [f"{k}={tags[k]}" for k in ("q", "eta") if tags[k]]
    if every_axis or cell.shots:
        parts.append(f"shots={tags['shots']}")
    if every_axis or cell.unlabeled_fraction != 1.0:
        parts.append(f"frac={tags['fraction']}")
    if with_seed:
        # A predefined split is a repetition like a seed: shown with it, pooled without it.
        parts += [f"split={tags[SPLIT]}"] if tags[SPLIT] else []
        parts.append(f"seed={tags[SEED]}")
    return " ".join(parts)


def trial_tags(spec: TrialSpec) -> dict[str, str]:
    """The tags of a trial's run (a rerun's also name the run it reruns and what changed)."""
    tags = {
        METHOD: spec.method,
        LABEL: spec.label,
        **cell_tags(spec.cell),
        SIGNATURE: spec.signature,
        STUDY: spec.study,
        OBJECTIVE: spec.objective,
        CELL: cell_label(spec.cell, every_axis=True),
    }
    if spec.optuna_trial is not None:
        tags[OPTUNA_TRIAL] = str(spec.optuna_trial)
    if spec.rerun_of is not None:
        tags[RERUN_OF] = spec.rerun_of
    if spec.variant is not None:
        tags[VARIANT] = spec.variant
    return tags


def varying_axes(cells: Iterable[CellSpec]) -> tuple[str, ...]:
    """The cell axes (and the predefined split) whose values differ across ``cells``."""
    values = [cell_tags(c) for c in cells]
    return tuple(a for a in (*CELL_AXES, SPLIT) if len({v[a] for v in values}) > 1)


AXIS_SHORT = {"fraction": "frac"}
"""How a run name writes an axis (the others by their tag name)."""


@dataclass(frozen=True)
class RunNames:
    """Short trial run names that fit MLflow's run list: ``coreg q=0.3 eta=0.1 s0``, the row label
    (a rerun's with its variant: ``coreg [no_prototypes] s1``), the cell axes that vary in the sweep,
    the seed, and ``#n`` (the Optuna trial) for a study that samples several trials. The full cell
    is in the ``cell`` tag and the run's description."""

    varying: tuple[str, ...] = ()
    numbered: frozenset[str] = frozenset()
    """Studies with more than one trial."""

    def __call__(self, spec: TrialSpec) -> str:
        tags = cell_tags(spec.cell)
        parts = [f"{spec.label} [{spec.variant}]" if spec.variant else spec.label]
        for axis in self.varying:
            parts.append(tags[axis] if axis in ("dataset", "annotator") else f"{AXIS_SHORT.get(axis, axis)}={tags[axis]}")
        parts.append(f"s{spec.seed}")
        if spec.study in self.numbered and spec.optuna_trial is not None:
            parts.append(f"#{spec.optuna_trial}")
        return " ".join(parts)


PERCENT_METRICS = (TEST_ACC, TEST_ACC_SELECTED, "val/covering_rate", "pl/acc")
"""Fractions shown in % on the console, as in the tables."""


def shown(key: str, value: float) -> str:
    """A metric as the console shows it: ``91.25%`` for an accuracy, else 4 decimals."""
    return f"{100 * value:.2f}%" if key in PERCENT_METRICS or key.startswith("test/acc") else f"{value:.4f}"


def progress_label(spec: TrialSpec) -> str:
    """How the console names a trial: its row label and cell (a rerun: its variant and seed)."""
    if spec.rerun_of is not None:
        return f"{spec.method} [{spec.variant}] seed={spec.seed}"
    return f"{spec.label} {cell_label(spec.cell, every_axis=True)}"


def row_label(tags: Mapping[str, str]) -> str:
    """A trial run's row in the results tables: its grid label, and its variant for a rerun."""
    base, variant = tags.get(LABEL) or tags[METHOD], tags.get(VARIANT, "")
    return f"{base} [{variant}]" if variant else base


def sweep_tags(grid_signature: str, grid_file: str) -> dict[str, str]:
    return {KIND: SWEEP, GRID_SIGNATURE: grid_signature, GRID_FILE: grid_file}


def sweep_run_name(experiment: str, when: str) -> str:
    return f"sweep {experiment} {when}"


def annotation_tags(cell: CellSpec, annotation_key: str, cached: bool) -> dict[str, str]:
    """An annotation run's tags: the cell's, without the seed for a seed-free (non-synthetic) annotator."""
    tags = cell_tags(cell)
    if cell.annotator_kind != "synthetic":
        tags[SEED] = ""
    return {KIND: ANNOTATION, ANNOTATION_KEY: annotation_key, CACHED: str(cached), **tags}


def annotation_input_name(cell: CellSpec) -> str:
    """The name of a trial's annotation as an ``mlflow.data`` input: ``digits flip q=0.3 eta=0.1``
    (a synthetic annotator's candidate sets depend on the seed too: ``... seed=0``)."""
    return cell_label(cell, with_seed=cell.annotator_kind == "synthetic")


def annotation_run_name(tags: Mapping[str, str]) -> str:
    name = f"annotation {tags['dataset']} {tags['annotator']}"
    return name + "".join(f" {axis}={tags[axis]}" for axis in ("q", "eta", SEED) if tags.get(axis))


# System tags ---------------------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def system_tags(entry_point: str) -> dict[str, str]:
    """MLflow's system tags for a run the driver creates (the client API sets none): the user, the
    entry point as the run's source (the run list's Source column), and the project's git commit
    (its Version column) with ``mlflow.source.git.dirty`` when tracked files differ from it. Outside
    a git checkout (an installed package) there is no commit tag."""
    tags = {
        MLFLOW_USER: os.environ.get("USER") or getpass.getuser(),
        MLFLOW_SOURCE_NAME: entry_point,
        MLFLOW_SOURCE_TYPE: "LOCAL",
        MLFLOW_PROJECT_ENTRY_POINT: f"python -m {entry_point}",
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit.strip()
        tags[MLFLOW_GIT_DIRTY] = str(bool((_git("status", "--porcelain", "--untracked-files=no") or "").strip())).lower()
    return tags


# Summary metrics of the parent run and the saved run-list view --------------------------------

SUMMARY_STATS = ("acc_selected_mean", "acc_selected_std", "objective_mean", "objective_std")
"""Per column and row: the selected test accuracy and the label-free objective of the chosen runs,
mean and std over seeds."""


def metric_key(text: str) -> str:
    """``text`` as a piece of an MLflow metric name (which allows letters, digits, ``_ - . / ``
    and spaces): ``q=0.3 eta=0.1`` -> ``q_0.3 eta_0.1``, ``coreg [no_prototypes]`` -> ``coreg no_prototypes``."""
    text = text.replace("[", "").replace("]", "")
    return re.sub(r"[^\w\-. ]+", "_", text).strip("_ .") or "_"


def summary_metric(column: str, row: str, stat: str) -> str:
    """``q_0.3 eta_0.1/coreg/acc_selected_mean``: grouped by column, so the parent run's chart view
    has one section per cell with its methods side by side."""
    return f"{metric_key(column)}/{metric_key(row)}/{stat}"


VIEW_STATE_TAG = "mlflow.sharedViewState.results"
"""Experiment tag holding the run-list view opened by :func:`run_list_url` (MLflow's shared view
state: search filter, order and columns as JSON)."""


def run_list_view(objective_keys: Iterable[str]) -> dict[str, Any]:
    """The trial runs, best selected accuracy first, with the columns a researcher compares:
    selected and last test accuracy, the objectives, the winner tags, seed, collapse, variant
    (few enough to fit a screen; the run name says the method and the varying cell axes)."""
    metrics = [TEST_ACC_SELECTED, TEST_ACC, *sorted(set(objective_keys))]
    tags = [CELL_WINNER, BEST_IN_CELL, SEED, COLLAPSE, VARIANT]  # method and cell are in the run name
    return {
        "searchFilter": f"tags.{KIND} = '{TRIAL}'",
        "orderByKey": f"metrics.`{TEST_ACC_SELECTED}`",
        "orderByAsc": False,
        "selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"tags.`{t}`" for t in tags],
    }


def ui_address(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: the tracking server itself, else what ``mlflow ui``
    serves on by default."""
    return redact(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_list_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of the experiment's run list in the view of :func:`run_list_view`."""
    key = VIEW_STATE_TAG.rsplit(".", 1)[1]
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def redact(uri: str) -> str:
    """``uri`` without the credentials of its user-info part (``http://user:token@host`` ->
    ``http://host``): what is shown or logged anywhere. MLflow takes credentials from
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``), so the
    redacted URI still works where they are set."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def describe_trial(spec: TrialSpec, run_id: str, tracking_uri: str) -> str:
    """Markdown for a trial run's description in the MLflow UI: copyable rerun and ablation commands."""
    from trainables.registry import ALGORITHMS

    base = f"python -m orchestrator.rerun {run_id} --tracking-uri {redact(tracking_uri)}"
    lines = [
        f"**{spec.method}** on {cell_label(spec.cell, every_axis=True)} (signature `{spec.signature}`)",
        "",
        "Rerun this configuration:",
        "```",
        base,
        "```",
    ]
    ablations = ALGORITHMS[spec.method].ablations
    if ablations:
        lines += ["", "Run each ablation of the method on this configuration:", "```"]
        lines += [f"{base} --ablation {name}" for name in ablations]
        lines += ["```"]
    lines += ["", "Other seeds or overrides: add `--seeds 0 1 2` or `--set training.lr=0.01 --set params.<name>=<value>`."]
    return "\n".join(lines)


# Search filters -------------------------------------------------------------------------------


def tag_filter(tags: Mapping[str, Any], parent: str | None = None) -> str:
    """Runs carrying every tag of ``tags`` (and nested under ``parent``)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if parent is not None:
        clauses.append(f"tags.`{PARENT_TAG}` = '{parent}'")
    return " and ".join(clauses)


def open_runs_filter(parent: str) -> str:
    """Children of ``parent`` without a final status."""
    return f"{tag_filter({}, parent)} and attributes.status = 'RUNNING'"


def sweeps_filter() -> str:
    return tag_filter({KIND: SWEEP})


def trials_filter(parent: str) -> str:
    return tag_filter({KIND: TRIAL}, parent)


TRIALS_ORDER = [f"tags.{CELL} ASC", f"tags.{METHOD} ASC"]
NEWEST_FIRST = ["attributes.start_time DESC"]
