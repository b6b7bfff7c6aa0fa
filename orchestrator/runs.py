"""The run layout in MLflow: every tag, metric name, run name, label and search filter the driver
writes or queries, in one place (tracking, reports, reruns and the rerun page import them).

Layout of a sweep (experiment = grid ``experiment``):

- one parent run per sweep (``kind=sweep``, ``grid_signature``), holding the grid file, the
  resolved grid (``grid_resolved.json``) and the results tables;
- a nested run per annotation (``kind=annotation``, ``annotation_key`` and the cell's tags) with
  its statistics as ``annotation/<stat>`` metrics;
- a nested run per Tune trial (``kind=trial``) tagged with its cell, method, row label, signature,
  study and objective (reruns also ``rerun_of`` and ``variant``), its metrics under
  :data:`REPORTED_PREFIXES` (step = epoch) and ``resolved_config.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

if TYPE_CHECKING:  # the rerun page imports this module without torch
    from trainables.spec import CellSpec, TrialSpec

PARENT_TAG = MLFLOW_PARENT_RUN_ID
RUN_NAME_TAG = MLFLOW_RUN_NAME
NOTE_TAG = "mlflow.note.content"
"""The run's description in the MLflow UI (the rerun commands)."""

KIND = "kind"
SWEEP, TRIAL, ANNOTATION = "sweep", "trial", "annotation"

# Tags of a sweep run
GRID_SIGNATURE, GRID_FILE, RESUMES = "grid_signature", "grid_file", "resumes"
TRIALS_FAILED, TRIALS_RUN = "trials_failed", "trials_run"
# Tags of a trial run (besides the cell's and :func:`trial_tags`)
TUNE_TRIAL_ID, CHECKPOINT, RESUMED, RETRIES = "tune_trial_id", "checkpoint", "resumed", "retries"
RESTARTED = "restarted"
"""Why a resumed trial started again from its first epoch (its checkpoint was gone)."""
ERROR, LAST_ERROR, ARTIFACTS_ERROR = "error", "last_error", "artifacts_error"
FINAL_TEST_ACC, BEST_IN_CELL = "final_test_acc", "best_in_cell"
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


def trial_run_name(spec: TrialSpec, tune_trial_id: str) -> str:
    return f"{spec.method} {cell_label(spec.cell, every_axis=True)} #{tune_trial_id.rsplit('_', 1)[-1]}"


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


def annotation_run_name(tags: Mapping[str, str]) -> str:
    name = f"annotation {tags['dataset']} {tags['annotator']}"
    return name + "".join(f" {axis}={tags[axis]}" for axis in ("q", "eta", SEED) if tags.get(axis))


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
