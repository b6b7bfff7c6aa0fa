"""Per-trial figures, drawn on the driver from what the trial reported.

The MLflow callback keeps every trial's per-epoch results; when the trial finishes it logs these
figures as ``plots/*.png`` of the trial's run:

- ``learning_curves.png``: test accuracy (last and label-free selected), pseudo-label accuracy and
  the validation covering rate per epoch; next to it the training losses;
- ``clean_split.png``: size of the clean split and its precision / recall per epoch (only for
  methods that report a split);
- ``confusion_matrix.png``: the final model's test predictions against the true test labels, rows
  normalised per true class, with the class names.

Matplotlib's object API only (``Figure`` with the Agg canvas, no ``pyplot``): no global figure
state and no display needed on a cluster's driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

ACCURACIES = {
    "test/acc": "test acc (last epoch)",
    "test/acc_selected": "test acc (label-free selected)",
    "test/acc_net_a": "test acc net A",
    "test/acc_net_b": "test acc net B",
    "pl/acc": "pseudo-label acc (train)",
    "val/covering_rate": "val covering rate",
}
SPLIT_RATES = {"split/precision": "precision", "split/recall": "recall", "split/fraction": "fraction of train"}
ANNOTATE_UP_TO = 20
"""Confusion matrices with at most this many classes show their counts in the cells."""
NAME_TICKS_UP_TO = 30
"""... and at most this many show class names on the axes (CIFAR-100's would be unreadable)."""


def series(history: Sequence[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one metric; a retried trial reports some epochs twice: the last one wins."""
    by_epoch = {int(r["epoch"]): float(r[key]) for r in history if key in r and "epoch" in r}
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(history: Sequence[dict[str, float]], title: str = "") -> Figure | None:
    """Accuracies per epoch and, when reported, the training losses (``train/loss*``). None without
    accuracies."""
    keys = {r_key for r in history for r_key in r}
    accuracies = [k for k in ACCURACIES if k in keys]
    losses = sorted(k for k in keys if k.startswith("train/loss"))  # not the lr nor diagnostics such as train/u_weight
    if not accuracies:
        return None
    fig = _figure(12 if losses else 7, 4.5)
    axes = fig.subplots(1, 2 if losses else 1, squeeze=False)[0]
    ax = axes[0]
    for key in accuracies:
        style = {"ls": "--"} if key == "test/acc_selected" else {"lw": 1, "alpha": 0.6} if "net_" in key else {}
        ax.plot(*series(history, key), marker=".", label=ACCURACIES[key], **style)
    ax.set(ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if losses:
        ax = axes[1]
        for key in losses:
            ax.plot(*series(history, key), marker=".", label=key.removeprefix("train/"))
        ax.set(ylabel="loss", title="training losses")
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def clean_split(history: Sequence[dict[str, float]], title: str = "") -> Figure | None:
    """Clean-split size (left axis) and its precision / recall / fraction (right axis) per epoch.
    None for methods that report no split."""
    epochs, sizes = series(history, "split/size")
    if not epochs:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    ax.bar(epochs, sizes, color="0.8", label="size (samples)")
    ax.set(ylabel="clean split size (samples)", title="clean split")
    _epoch_axis(ax)
    rates = ax.twinx()
    for key, label in SPLIT_RATES.items():
        if any(key in r for r in history):
            rates.plot(*series(history, key), marker=".", label=label)
    rates.set(ylabel="rate", ylim=(0, 1.02))
    handles = [h for a in (ax, rates) for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in (ax, rates) for lab in a.get_legend_handles_labels()[1]]
    rates.legend(handles, labels, fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix of the final test predictions, with class names."""
    c = len(class_names)
    counts = confusion_counts(y_true, y_pred, c)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(4 + 0.45 * c, 14)
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if c <= NAME_TICKS_UP_TO:
        ax.set_xticks(range(c), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(c), class_names, fontsize=8)
    if c <= ANNOTATE_UP_TO:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"test confusion matrix (acc {100 * acc:.2f}%)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def trial_figures(
    history: Sequence[dict[str, float]],
    *,
    test_pred: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> dict[str, Figure]:
    """Every figure that applies to a trial, by file name. The confusion matrix needs the final test
    predictions, the true test labels and the class names."""
    figures = {
        "learning_curves.png": learning_curves(history, title),
        "clean_split.png": clean_split(history, title),
    }
    if test_pred is not None and test_y is not None and class_names is not None:
        if len(test_pred) != len(test_y):
            raise ValueError(f"{len(test_pred)} test predictions for {len(test_y)} test labels")
        figures["confusion_matrix.png"] = confusion_matrix(test_y, test_pred, class_names, title)
    return {name: fig for name, fig in figures.items() if fig is not None}


def save_figures(figures: dict[str, Figure], directory: Path, dpi: int = 110) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=dpi)
        paths.append(directory / name)
    return paths
