"""Results tables from run objects as MLflow returns them (faked: only what the report reads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator import report

CELL = {"q": "", "eta": "", "shots": "0", "fraction": "1"}


def trial_run(run_id, method, dataset, annotator, seed, acc, objective):
    tags = {"method": method, "dataset": dataset, "annotator": annotator, "seed": str(seed), "split": "",
            "objective": "val/covering_rate", **CELL}  # fmt: skip
    metrics = {"test/acc": acc, "test/acc_selected": acc - 0.01, "val/covering_rate": objective}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="FINISHED"), data=SimpleNamespace(tags=tags, metrics=metrics))


def annotation_run(dataset, annotator, kind, metrics):
    tags = {"kind": "annotation", "dataset": dataset, "annotator": annotator, "seed": "", **CELL}
    params = {"annotator.kind": kind, "annotator.name": annotator, "dataset.name": dataset}
    return SimpleNamespace(info=SimpleNamespace(run_id=f"ann-{dataset}-{annotator}", status="FINISHED"),
                           data=SimpleNamespace(tags=tags, metrics=metrics, params=params))  # fmt: skip


def test_zero_shot_rows_come_from_the_annotation_runs_of_vlm_columns():
    trials = [
        trial_run("a0", "cc", "cifar10", "clip_vitb32", 0, 0.80, 0.9),
        trial_run("a1", "cc", "cifar10", "clip_vitb32", 1, 0.84, 0.9),
        trial_run("b0", "cc", "cifar10", "flip", 0, 0.70, 0.9),
    ]
    annotations = [
        annotation_run("cifar10", "clip_vitb32", "clip", {"annotation/zs_acc_test": 0.88, "annotation/zs_acc_avg_test": 0.89,
                                                          "annotation/partial_acc": 0.95}),  # fmt: skip
        annotation_run("cifar10", "flip", "synthetic", {"annotation/partial_acc": 1.0}),
    ]
    tables, flags = report.build(trials, annotations)
    assert tables.rows_order == ["cc", "zero-shot", "zero-shot*"]
    rows = {(r["row"], r["column"]): r for r in tables.rows}
    assert set(rows) == {("cc", "clip_vitb32"), ("cc", "flip"), ("zero-shot", "clip_vitb32"), ("zero-shot*", "clip_vitb32")}
    for row, value in (("zero-shot", 0.88), ("zero-shot*", 0.89)):
        entry = rows[(row, "clip_vitb32")]
        assert entry["test_acc_mean"] == entry["selected_acc_mean"] == pytest.approx(value)
        assert entry["best_runs"] == "" and entry["seeds"] == 1
    # the annotator beats the students here, and is marked as the column's best
    assert rows[("zero-shot*", "clip_vitb32")]["best_in_column"] and not rows[("cc", "clip_vitb32")]["best_in_column"]
    assert set(flags) == {"a0", "a1", "b0"}  # no annotation run is a chosen trial run
    text = tables.markdown()
    assert "| zero-shot | 88.00 (n=1) | - |" in text and "| zero-shot* | **89.00 (n=1)** | - |" in text


def test_no_zero_shot_rows_without_a_vlm_annotator():
    trials = [trial_run("b0", "cc", "digits", "flip", 0, 0.7, 0.9)]
    tables, _ = report.build(trials, [annotation_run("digits", "flip", "synthetic", {"annotation/partial_acc": 1.0})])
    assert tables.rows_order == ["cc"]


def test_the_students_sizes_are_a_table_of_their_own():
    """Table V's model size: the mean ``student_kb`` of each entry's chosen runs (one per seed);
    the losing run of a seed and a row without students do not count."""
    trials = [
        trial_run("a0", "coreg", "digits", "flip", 0, 0.90, 0.9),
        trial_run("a1", "coreg", "digits", "flip", 1, 0.92, 0.9),
        trial_run("a2", "coreg", "digits", "flip", 1, 0.50, 0.1),  # seed 1's other trial: not chosen
        trial_run("b0", "vlm_lora", "digits", "flip", 0, 0.60, 0.5),
        trial_run("c0", "cc", "digits", "flip", 0, 0.80, 0.5),  # its student failed to log
    ]
    for run, kb in zip(trials, ("1000", "1200", "99999", "13000000", None)):
        if kb is not None:
            run.data.tags["student_kb"] = kb
    tables, _ = report.build(trials, [])
    rows = {r["row"]: r for r in tables.rows}
    assert rows["coreg"]["student_kb_mean"] == 1100.0 and rows["vlm_lora"]["student_kb_mean"] == 13_000_000.0
    text = tables.markdown()
    assert "### Deployable model size in KiB" in text
    assert "| coreg | 1,100 |" in text and "| vlm_lora | 13,000,000 |" in text and "| cc | - |" in text


def test_no_size_table_without_students():
    tables, _ = report.build([trial_run("b0", "cc", "digits", "flip", 0, 0.7, 0.9)], [])
    assert "model size" not in tables.markdown()
