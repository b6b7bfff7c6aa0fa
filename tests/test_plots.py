"""Per-trial figures from a hand-made metric history."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from orchestrator.plots import (
    clean_split,
    confusion_counts,
    confusion_matrix,
    learning_curves,
    save_figures,
    series,
    trial_figures,
)

NAMES = ["cat", "dog", "fish"]


def history(with_split: bool = True) -> list[dict[str, float]]:
    rows = []
    for epoch in range(1, 5):
        row = {"epoch": epoch, "test/acc": 0.5 + 0.1 * epoch, "test/acc_selected": 0.55, "pl/acc": 0.4 + 0.1 * epoch}
        row |= {"train/loss": 2.0 / epoch, "train/loss_ce": 1.0 / epoch, "train/lr": 0.05, "train/u_weight": 0.5}
        row["time/epoch_s"] = 1.0
        if with_split:
            row |= {"split/size": 10.0 * epoch, "split/fraction": 0.1 * epoch}
            row |= {"split/precision": 0.9, "split/recall": 0.2 * epoch}
        rows.append(row)
    return rows


def lines(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_series_orders_epochs_and_a_retried_epoch_keeps_its_last_value():
    rows = [{"epoch": 2, "test/acc": 0.3}, {"epoch": 1, "test/acc": 0.1}, {"epoch": 2, "test/acc": 0.5}, {"epoch": 3}]
    assert series(rows, "test/acc") == ([1, 2], [0.1, 0.5])


def test_learning_curves_plot_accuracies_and_losses_but_not_the_learning_rate():
    fig = learning_curves(history())
    acc, loss = fig.axes
    assert lines(acc)["test acc (last epoch)"] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert lines(acc)["pseudo-label acc (train)"] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert "test acc (label-free selected)" in lines(acc)
    assert set(lines(loss)) == {"loss", "loss_ce"}  # no lr, no diagnostics, no time
    assert learning_curves([{"epoch": 1, "train/loss": 1.0}]) is None


def test_clean_split_only_for_methods_that_report_one():
    assert clean_split(history(with_split=False)) is None
    fig = clean_split(history())
    sizes, rates = fig.axes
    assert [p.get_height() for p in sizes.patches] == [10, 20, 30, 40]
    assert lines(rates)["precision"] == [0.9] * 4 and lines(rates)["recall"] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_confusion_counts_rows_are_true_classes():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    assert confusion_counts(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]
    ax = confusion_matrix(y_true, y_pred, NAMES).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    shown = np.asarray(ax.get_images()[0].get_array())
    np.testing.assert_allclose(shown, [[0.5, 0.5, 0], [0, 2 / 3, 1 / 3], [1, 0, 0]])  # row-normalised
    assert "acc 50.00%" in ax.get_title()


def test_trial_figures_are_written_as_pngs(tmp_path):
    y_true = np.array([0, 1, 2, 2])
    figures = trial_figures(history(), test_pred=np.array([0, 1, 2, 1]), test_y=y_true, class_names=NAMES, title="t")
    paths = save_figures(figures, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["clean_split.png", "confusion_matrix.png", "learning_curves.png"]
    for path in paths:
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 300
    no_split = trial_figures(history(with_split=False))  # and no predictions: no confusion matrix
    assert sorted(no_split) == ["learning_curves.png"]
    with pytest.raises(ValueError, match="3 test predictions for 4 test labels"):
        trial_figures(history(), test_pred=np.zeros(3, int), test_y=y_true, class_names=NAMES)
