"""Matplotlib figures of the evaluation, written as PNG files."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def confusion_matrix_png(matrix: np.ndarray, classes: list[str], title: str, path: Path,
                         normalised: bool) -> None:
    """Draw a confusion matrix with true classes as rows and predictions as columns."""
    figure, axes = plt.subplots(figsize=(9, 8))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalised else matrix
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalised else None)
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    limit = shown.max() / 2 if shown.size else 0
    for (row, column), value in np.ndenumerate(shown):
        if matrix[row, column]:
            text = f"{value:.2f}" if normalised else str(int(value))
            axes.text(column, row, text, ha="center", va="center", fontsize=7,
                      color="white" if value > limit else "black")
    _save(figure, path)


def threshold_png(curve: pd.DataFrame, threshold: float, title: str, path: Path) -> None:
    """Draw macro-F1, accuracy and coverage of kept predictions against the threshold."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for column in ("macro_f1", "accuracy", "coverage"):
        axes.plot(curve["threshold"], curve[column], label=column.replace("_", "-"))
    axes.axvline(threshold, color="grey", linestyle="--", label=f"threshold {threshold:.2f}")
    axes.set_xlabel("confidence threshold")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title(title)
    _save(figure, path)


def per_class_f1_png(per_class: dict, title: str, path: Path) -> None:
    """Draw a horizontal bar per class with its F1 and support."""
    names = list(per_class)
    scores = [per_class[n]["f1"] for n in names]
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(names) + 1))
    bars = axes.barh(names, scores, color="tab:blue")
    for bar, name in zip(bars, names):
        axes.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2,
                  f"{per_class[name]['f1']:.2f} (n={per_class[name]['support']})", va="center",
                  fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.15)
    axes.set_xlabel("F1")
    axes.set_title(title)
    _save(figure, path)


def reliability_png(bins: pd.DataFrame, ece: float, title: str, path: Path) -> None:
    """Draw accuracy against mean confidence per bin, with the diagonal of perfect calibration."""
    used = bins[bins["images"] > 0]
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    axes.plot(used["confidence"].astype(float), used["accuracy"].astype(float), marker="o",
              label=f"model (ECE {ece:.3f})")
    axes.set_xlabel("mean confidence")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left")
    axes.set_title(title)
    _save(figure, path)


def mistakes_png(mistakes: pd.DataFrame, path: Path, columns: int = 6) -> None:
    """Draw a grid of misclassified images titled with true and predicted class."""
    count = max(len(mistakes), 1)
    rows = (count + columns - 1) // columns
    figure, grid = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, (_, row) in zip(grid.flat, mistakes.iterrows()):
        with Image.open(row["file"]) as image:
            image.thumbnail((256, 256))
            axes.imshow(image.convert("RGB"))
        axes.set_title(f"true {row['class']}\npred {row['predicted']} {row['confidence']:.2f}",
                       fontsize=8)
    if mistakes.empty:
        grid.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle("Most confident mistakes on test")
    _save(figure, path)
