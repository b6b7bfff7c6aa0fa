"""Paper-style results tables of a sweep, built from its MLflow runs and logged on its parent run.

Rows are methods (an ablation or an overridden rerun is a row of its own, ``coreg [no_prototypes]``);
columns are the grid cells without the seed, labelled by the axes that vary in the sweep: datasets
(and annotators) for a Table I-style sweep, ``q=0.3 eta=0.1`` for a Table III-style one. For every
cell and seed the best run of the row is chosen by the study's label-free objective (never by a test
metric); an entry is the mean +- std over seeds (and predefined splits, for data sets that have them) of
that run's test accuracy, in %, with the best
entry of each column marked. Two accuracies are reported side by side: the last epoch's, and the one
at the epoch the objective selected (``test/acc_selected``).

A column of unlabeled images (a flat image folder) has no accuracy: its entries say ``no labels``
with the label-free objective of the chosen runs.

Every column annotated by a VLM (CLIP, or an image-text-to-text ``vlm``) also has the rows ``zero-shot`` and ``zero-shot*``: the
annotator's own test accuracy (single template; template average), read from the annotation runs.

Beside it, the annotation summary: per data set and annotator (and q, eta for synthetic ones), the
zero-shot test accuracy (CLIP: single template and template average), the partial accuracy (true
label in S), the mean |S| and the realised eta, averaged over seeds.

Artifacts on the parent run: ``tables/results.md``, ``tables/results.csv`` (one line per row and
column with the best run id of every seed), ``tables/results.html`` and ``tables/annotations.csv``.
The chosen runs are tagged ``best_in_cell=true`` (every other trial run of the same row, cell and
seed ``false``), so MLflow's search box finds them: ``tags.best_in_cell = 'true'``. Every study has
one: the tag says which hyperparameters won a study, not which method won the cell. That is
``cell_winner=true``: the chosen runs of the row with the best mean selected test accuracy of the
column (a reporting tag, like the bold entries; nothing is trained or selected from it).

The parent run also gets the tables as metrics (:func:`orchestrator.runs.summary_metric`: mean and
std of the selected test accuracy and of the objective, per column and row), so that MLflow's chart
view and ``search_runs`` work on it, and as an ``mlflow.log_table`` table (``tables/results.json``)
that ``mlflow.load_table`` reads back.
"""

from __future__ import annotations

import csv
import html
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestrator import runs
from orchestrator.config import OBJECTIVES
from orchestrator.runs import CELL_AXES, row_label

ANNOTATION_COLUMNS = (
    ("zero-shot acc % (test)", runs.ZS_ACC, 100.0),
    ("zero-shot* acc % (test)", runs.ZS_ACC_AVG, 100.0),
    ("partial acc %", f"{runs.ANNOTATION_PREFIX}partial_acc", 100.0),
    ("mean set size", f"{runs.ANNOTATION_PREFIX}mean_set_size", 1.0),
    ("eta realised %", f"{runs.ANNOTATION_PREFIX}eta_realised", 100.0),
    ("unparseable %", f"{runs.ANNOTATION_PREFIX}unparseable_rate", 100.0),
)
ZERO_SHOT_ROWS = (("zero-shot", runs.ZS_ACC), ("zero-shot*", runs.ZS_ACC_AVG))
"""The rows of a VLM annotator's own test accuracy (single template; template average)."""
VLM_KINDS = ("clip", "vlm", "ensemble")


@dataclass
class Entry:
    """One table entry: the best run of a row for each seed of a cell."""

    row: str
    column: str
    cell: dict[str, str]
    best_runs: dict[str, str] = field(default_factory=dict)  # seed -> run id
    last: list[float] = field(default_factory=list)
    selected: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    """The label-free objective of each chosen run (empty for the zero-shot rows); a data set
    without labels (no accuracy exists) has only these."""
    objective_name: str = ""
    sizes: list[float] = field(default_factory=list)
    """The deployable student's size in KiB of each chosen run (``student_kb``; Table V's model size)."""

    @staticmethod
    def _stats(values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def last_stats(self) -> tuple[float, float]:
        return self._stats(self.last)

    @property
    def selected_stats(self) -> tuple[float, float]:
        return self._stats(self.selected)


@dataclass
class Tables:
    entries: list[Entry]
    rows_order: list[str]
    columns_order: list[str]
    annotations: list[dict[str, Any]]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per entry (the CSV's lines)."""
        out = []
        for e in self.entries:
            (lm, ls), (sm, ss) = e.last_stats, e.selected_stats
            out.append(
                {
                    "row": e.row,
                    "column": e.column,
                    **e.cell,
                    "seeds": len(e.last),
                    "test_acc_mean": lm,
                    "test_acc_std": ls,
                    "selected_acc_mean": sm,
                    "selected_acc_std": ss,
                    "objective_mean": self._stats_of(e.objective)[0],
                    "objective_std": self._stats_of(e.objective)[1],
                    "best_in_column": self.is_best(e, "last"),
                    "best_in_column_selected": self.is_best(e, "selected"),
                    "student_kb_mean": self._stats_of(e.sizes)[0],
                    "best_runs": ";".join(f"seed{s}:{r}" for s, r in sorted(e.best_runs.items())),
                }
            )
        return out

    @staticmethod
    def _stats_of(values: list[float]) -> tuple[float, float]:
        return Entry._stats(values)

    def summary_metrics(self) -> dict[str, float]:
        """The parent run's metrics: per column and row of a trained method, mean and std of the
        selected test accuracy and of the objective (fractions, like the trial runs' metrics)."""
        out = {}
        for e in self.entries:
            if not e.objective:
                continue
            stats = (*e.selected_stats, *Entry._stats(e.objective))
            out.update({runs.summary_metric(e.column, e.row, k): v for k, v in zip(runs.SUMMARY_STATS, stats)})
        return out

    def winners(self) -> set[str]:
        """Run ids of the chosen runs of each column's winning row (best mean selected accuracy)."""
        return {r for e in self.entries if e.objective and self.is_best(e, "selected") for r in e.best_runs.values()}

    def _entry(self, row: str, column: str) -> Entry | None:
        return next((e for e in self.entries if e.row == row and e.column == column), None)

    def is_best(self, entry: Entry, which: str) -> bool:
        def mean(e: Entry) -> float:
            return (e.last_stats if which == "last" else e.selected_stats)[0]

        same_column = [mean(e) for e in self.entries if e.column == entry.column and e.last]
        return bool(same_column) and mean(entry) == max(same_column)

    def _grid(self, which: str, fmt) -> list[list[str]]:
        lines = []
        for row in self.rows_order:
            cells = []
            for column in self.columns_order:
                e = self._entry(row, column)
                if e is not None and not e.last and e.objective:  # unlabeled images: say so, never a number
                    cells.append(f"no labels ({e.objective_name} {statistics.fmean(e.objective):.3f})")
                    continue
                if e is None or not e.last:
                    cells.append("-")
                    continue
                m, s = e.last_stats if which == "last" else e.selected_stats
                text = f"{100 * m:.2f} ± {100 * s:.2f}" if len(e.last) > 1 else f"{100 * m:.2f} (n=1)"
                cells.append(fmt(text, self.is_best(e, which)))
            lines.append([row, *cells])
        return lines

    def size_grid(self) -> list[list[str]]:
        """Per row and column, the mean size of the chosen runs' students in KiB ("-": none logged)."""
        def size(row: str, column: str) -> str:
            e = self._entry(row, column)
            return f"{statistics.fmean(e.sizes):,.0f}" if e is not None and e.sizes else "-"

        return [[row, *(size(row, column) for column in self.columns_order)] for row in self.rows_order]

    def markdown(self) -> str:
        head = "| method | " + " | ".join(self.columns_order) + " |"
        sep = "|---|" + "---|" * len(self.columns_order)
        parts = []
        for which, title in (
            ("last", "Test accuracy % at the last epoch"),
            ("selected", "Test accuracy % at the epoch chosen by the label-free objective"),
        ):
            parts += [f"### {title} (mean ± std over seeds, and splits where a data set has them; best per column in bold)", "", head, sep]
            parts += ["| " + " | ".join(line) + " |" for line in self._grid(which, lambda t, b: f"**{t}**" if b else t)]
            parts.append("")
        if any(e.sizes for e in self.entries):
            parts += ["### Deployable model size in KiB (the trials' students, mean over seeds: Table V's model size)", "", head, sep]
            parts += ["| " + " | ".join(line) + " |" for line in self.size_grid()]
            parts.append("")
        parts += ["### Annotations (mean over seeds)", "", self._annotation_markdown()]
        return "\n".join(parts) + "\n"

    def _annotation_markdown(self) -> str:
        if not self.annotations:
            return "(no annotation runs)"
        keys = [k for k in ("dataset", "annotator", "q", "eta") if any(a[k] for a in self.annotations)]
        cols = [c for c in ANNOTATION_COLUMNS if any(a.get(c[1]) is not None for a in self.annotations)]
        lines = ["| " + " | ".join(keys + [c[0] for c in cols]) + " |", "|" + "---|" * (len(keys) + len(cols))]
        for a in self.annotations:
            values = [("-" if a.get(m) is None else f"{scale * a[m]:.2f}") for _, m, scale in cols]
            lines.append("| " + " | ".join([a[k] for k in keys] + values) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        rows = self.rows
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["row", "column"])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def annotations_csv(self) -> str:
        buf = io.StringIO()
        fields = ["dataset", "annotator", "q", "eta", "seeds"] + [m for _, m, _ in ANNOTATION_COLUMNS]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.annotations)
        return buf.getvalue()

    def html(self, title: str) -> str:
        def table(which: str, caption: str) -> str:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in ["method", *self.columns_order])
            body = "".join(
                "<tr>" + "".join(f"<td>{c}</td>" for c in line) + "</tr>"
                for line in self._grid(which, lambda t, b: f"<b>{html.escape(t)}</b>" if b else html.escape(t))
            )
            return f"<h3>{html.escape(caption)}</h3><table><tr>{head}</tr>{body}</table>"

        style = (
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
            "td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}td:first-child,th:first-child{text-align:left}"
            "b{color:#0a5}"
        )
        ann = self._annotation_markdown().splitlines()
        ann_html = ""
        if len(ann) > 2:
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in ann if not line.startswith("|---")]
            ann_html = "<h3>Annotations (mean over seeds)</h3><table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
                for i, row in enumerate(cells)
            ) + "</table>"
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body><h2>{html.escape(title)}</h2>"
            + table("last", "Test accuracy % at the last epoch (mean ± std over seeds)")
            + table("selected", "Test accuracy % at the epoch chosen by the label-free objective")
            + ann_html
            + "</body></html>"
        )

    def console(self) -> str:
        return self.markdown()


def _column_labels(cells: list[dict[str, str]]) -> dict[tuple, str]:
    """Label each cell by the axes that vary across the sweep (the dataset name when none does)."""
    varying = [a for a in CELL_AXES if len({c[a] for c in cells}) > 1]
    if "q" in varying or "eta" in varying:  # Table III style: a column is a (q, eta) pair
        varying = [a for a in CELL_AXES if a in varying or a in ("q", "eta")]
    labels = {}
    for c in cells:
        parts = []
        for axis in varying:
            if axis in ("q", "eta") and not c[axis]:
                continue  # an annotator without this axis (uniform sets have no q; VLMs neither)
            parts.append(c[axis] if axis in ("dataset", "annotator") else f"{'frac' if axis == 'fraction' else axis}={c[axis]}")
        labels[tuple(c[a] for a in CELL_AXES)] = " ".join(parts) or c["dataset"]
    return labels


def build(trial_runs: list[Any], annotation_runs: list[Any]) -> tuple[Tables, dict[str, bool]]:
    """Tables from finished trial runs (MLflow ``Run`` objects) and the best-run flag of every run."""
    groups: dict[tuple[str, tuple, str], list[Any]] = defaultdict(list)
    cells: dict[tuple, dict[str, str]] = {}
    for run in trial_runs:
        tags = run.data.tags
        objective = tags.get(runs.OBJECTIVE, "val/covering_rate")
        if run.info.status != "FINISHED" or not ({runs.TEST_ACC, objective} & set(run.data.metrics)):
            continue  # a finished run of unlabeled images has its objective and no test accuracy
        cell = {a: tags.get(a, "") for a in CELL_AXES}
        key = tuple(cell.values())
        cells[key] = cell
        # Replicates pooled in an entry: seeds, and the predefined splits of a data set that has them.
        replicate = tags.get(runs.SEED, "") + (f"/split{tags[runs.SPLIT]}" if tags.get(runs.SPLIT) else "")
        groups[(row_label(tags), key, replicate)].append(run)

    labels = _column_labels(list(cells.values()))
    entries: dict[tuple[str, tuple], Entry] = {}
    flags: dict[str, bool] = {}
    for (row, key, replicate), group in sorted(groups.items()):
        objective = group[0].data.tags.get(runs.OBJECTIVE, "val/covering_rate")
        sign = 1.0 if OBJECTIVES.get(objective, "max") == "max" else -1.0
        best = max(group, key=lambda r: sign * r.data.metrics.get(objective, -sign * float("inf")))
        for r in group:
            flags[r.info.run_id] = r is best
        entry = entries.setdefault((row, key), Entry(row, labels[key], cells[key]))
        entry.best_runs[replicate] = best.info.run_id
        if runs.STUDENT_KB in best.data.tags:
            entry.sizes.append(float(best.data.tags[runs.STUDENT_KB]))
        if runs.TEST_ACC not in best.data.metrics:
            entry.objective.append(best.data.metrics[objective])
            entry.objective_name = objective
            continue
        entry.last.append(best.data.metrics[runs.TEST_ACC])
        entry.selected.append(best.data.metrics.get(runs.TEST_ACC_SELECTED, best.data.metrics[runs.TEST_ACC]))
        if objective in best.data.metrics:
            entry.objective.append(best.data.metrics[objective])

    found = list(entries.values()) + _zero_shot_entries(annotation_runs, cells, labels)
    rows_order = sorted({e.row for e in found}, key=lambda r: (r.split(" [")[0], r))
    columns_order = [labels[k] for k in sorted(cells, key=lambda k: tuple(_sort_key(v) for v in k))]
    return Tables(found, rows_order, list(dict.fromkeys(columns_order)), _annotation_rows(annotation_runs)), flags


def _zero_shot_entries(annotation_runs: list[Any], cells: dict[tuple, dict[str, str]], labels: dict[tuple, str]) -> list[Entry]:
    """Rows ``zero-shot`` and ``zero-shot*`` of every VLM-annotated column: the annotator's own test
    accuracy from the column's annotation runs (one per predefined split; CLIP has no seed). The
    same value is the last-epoch and the selected entry; no run is chosen, so none is flagged."""
    out = []
    for key, cell in cells.items():
        source = [
            r for r in annotation_runs
            if r.data.params.get(runs.ANNOTATOR_KIND_PARAM) in VLM_KINDS
            and all(r.data.tags.get(axis, "") == cell[axis] for axis in ("dataset", "annotator"))
        ]  # fmt: skip
        for row, metric in ZERO_SHOT_ROWS:
            values = [r.data.metrics[metric] for r in source if metric in r.data.metrics]
            if values:
                out.append(Entry(row, labels[key], cell, last=values, selected=list(values)))
    return out


def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _annotation_rows(runs: list[Any]) -> list[dict[str, Any]]:
    grouped: dict[tuple, list[Any]] = defaultdict(list)
    for run in runs:
        tags = run.data.tags
        grouped[tuple(tags.get(k, "") for k in ("dataset", "annotator", "q", "eta"))].append(run)
    out = []
    for key, group in sorted(grouped.items()):
        row: dict[str, Any] = dict(zip(("dataset", "annotator", "q", "eta"), key))
        row["seeds"] = len(group)
        for _, metric, _ in ANNOTATION_COLUMNS:
            values = [r.data.metrics[metric] for r in group if metric in r.data.metrics]
            row[metric] = statistics.fmean(values) if values else None
        out.append(row)
    return out


TABLE_COLUMNS = ("row", "column", "seeds", "selected_acc_mean", "selected_acc_std", "test_acc_mean", "test_acc_std",
                 "objective_mean", "objective_std", "best_in_column_selected", "best_runs")
"""The columns of the parent run's ``tables/results.json`` (``mlflow.log_table``)."""


def publish(tracker, parent: str, title: str | None = None) -> Tables:
    """Build the tables of the sweep ``parent``, tag the best runs and the cell winners, log the
    tables as artifacts, tables and summary metrics of the parent run."""
    trial_runs = tracker.children(parent, runs.TRIAL)
    tables, flags = build(trial_runs, tracker.children(parent, runs.ANNOTATION))
    winners = tables.winners()
    for run in trial_runs:
        if run.info.run_id not in flags:
            continue  # unfinished or failed: in no table
        wanted = {runs.BEST_IN_CELL: flags[run.info.run_id], runs.CELL_WINNER: run.info.run_id in winners}
        changed = {k: str(v).lower() for k, v in wanted.items() if run.data.tags.get(k) != str(v).lower()}
        if changed:
            tracker.set_tags(run.info.run_id, changed)
    tracker.log_metrics(parent, tables.summary_metrics(), step=0)
    tracker.log_table(parent, {k: [row[k] for row in tables.rows] for k in TABLE_COLUMNS}, runs.RESULTS_TABLE)
    title = title or f"Results of {tracker.client.get_run(parent).info.run_name}"
    tracker.log_text(parent, tables.markdown(), runs.RESULTS_MD)
    tracker.log_text(parent, tables.csv(), runs.RESULTS_CSV)
    tracker.log_text(parent, tables.html(title), runs.RESULTS_HTML)
    tracker.log_text(parent, tables.annotations_csv(), runs.ANNOTATIONS_CSV)
    return tables
