"""Pure plotting functions: metrics or predictions in, a matplotlib Figure out.
Built without pyplot, so drawing is headless everywhere and leaves no global state behind."""

import os
from collections.abc import Sequence
from typing import IO

import numpy as np
from matplotlib.figure import Figure

from fmnist_lightning.outputs import atomic_write
from fmnist_lightning.reports.calibration import CalibrationSummary
from fmnist_lightning.reports.metrics_log import RunMetrics

DPI = 120
STAGE_STYLE = {
    "train": {"linestyle": "--", "label": "train"},
    "val": {"linestyle": "-", "label": "validation"},
}
CURVE_QUANTITIES = {"acc": "Accuracy", "loss": "Loss (cross-entropy)"}


def curve_figure(runs: Sequence[RunMetrics], quantity: str, stages: Sequence[str] = ("train", "val")) -> Figure:
    """Train and validation `quantity` ("acc" or "loss") per epoch; one colour per run when comparing.
    Epochs are 1-based, as Keras prints them; every point has a marker so a one-epoch run still shows."""
    figure = Figure(figsize=(7.5, 4.8), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        for stage in stages:
            style = STAGE_STYLE[stage]
            epochs, values = run.series(f"{stage}_{quantity}")
            if not epochs:
                continue
            label = (
                style["label"] if len(runs) == 1 else run.name if len(stages) == 1 else f"{run.name} ({style['label']})"
            )
            axes.plot(
                [epoch + 1 for epoch in epochs],
                values,
                marker="o",
                markersize=4,
                linestyle=style["linestyle"],
                color=color if len(runs) > 1 else ("C0" if stage == "train" else "C1"),
                label=label,
            )
    if len(runs) == 1 and f"test_{quantity}" in runs[0].final:
        test_value = runs[0].final[f"test_{quantity}"]
        axes.axhline(test_value, color="C2", linestyle=":", label=f"test: {test_value:.4f}")
    title = CURVE_QUANTITIES[quantity]
    axes.set_title(f"{title} per epoch" + (f": {runs[0].name}" if len(runs) == 1 else ""))
    axes.set_xlabel("epoch")
    axes.set_ylabel(title.lower() if quantity == "loss" else "accuracy (fraction correct)")
    last_epoch = max(max(run.series(f"{stage}_{quantity}")[0], default=0) for run in runs for stage in STAGE_STYLE)
    if last_epoch < 20:
        axes.set_xticks(range(1, last_epoch + 2))
    else:
        axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right" if quantity == "acc" else "upper right", fontsize="small")
    return figure


def confusion_matrix_figure(counts: np.ndarray, normalised: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    # not torchmetrics' plot_confusion_matrix: it goes through pyplot, writes 0.0 for 0.00 and fixes fontsize 15
    figure = Figure(figsize=(15, 6.8), dpi=DPI, layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, matrix, title, text_format in (
        (panels[0], counts, "Counts", "{:.0f}"),
        (panels[1], normalised, "Normalised by true class (rows sum to 1)", "{:.2f}"),
    ):
        image = axes.imshow(matrix, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axes, shrink=0.8)
        threshold = matrix.max() / 2
        for (row, column), value in np.ndenumerate(matrix):
            axes.text(
                column,
                row,
                text_format.format(value),
                ha="center",
                va="center",
                fontsize=7.5,
                color="white" if value > threshold else "black",
            )
        ticks = range(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=40, ha="right", rotation_mode="anchor")
        axes.set_yticks(ticks, class_names)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.set_title(title)
    figure.suptitle(f"Confusion matrix on {int(counts.sum()):,} test images")
    return figure


def image_grid_figure(
    images: np.ndarray, captions: Sequence[str], correct: Sequence[bool], title: str, columns: int = 5
) -> Figure:
    """28x28 images in a grid, each with a caption; green captions are right predictions, red wrong."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.1 * columns, 2.45 * rows + 0.5), dpi=DPI, layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for index, axes in enumerate(panels):
        axes.axis("off")
        if index >= len(images):
            continue
        axes.imshow(images[index], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes.set_title(captions[index], fontsize=8, color="tab:green" if correct[index] else "tab:red")
    figure.suptitle(title)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write a figure (format from the suffix: .png or .svg) through a temporary file."""
    with atomic_write(path) as file:
        write_figure(figure, file, os.fspath(path).rsplit(".", 1)[-1])


def write_figure(figure: Figure, file: IO[bytes], image_format: str) -> None:
    """Write a figure into an open binary file (one `atomic_write` gives)."""
    figure.savefig(file, format=image_format, dpi=DPI)


def calibration_figure(panels: dict[str, CalibrationSummary], subtitle: str | None = None) -> Figure:
    """Per panel: a reliability diagram (accuracy against confidence per bin, image counts on the bars) over a
    histogram of the confidence."""
    figure = Figure(figsize=(6.2 * len(panels), 7.6), dpi=DPI, layout="constrained")
    axes_grid = figure.subplots(2, len(panels), squeeze=False, height_ratios=(3, 1.4), sharex=True)
    for column, (name, summary) in enumerate(panels.items()):
        diagram, histogram = axes_grid[0, column], axes_grid[1, column]
        count = summary.bins["images"].numpy()
        filled = count > 0
        bins = len(count)
        lower = np.arange(bins) / bins
        confidence = np.divide(summary.bins["confidence"].numpy(), count, where=filled, out=np.zeros(bins))
        accuracy = np.divide(summary.bins["correct"].numpy(), count, where=filled, out=np.zeros(bins))
        width = 1 / bins
        diagram.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        diagram.bar(
            lower[filled],
            accuracy[filled],
            width=width,
            align="edge",
            color="C0",
            edgecolor="white",
            label="accuracy in the bin",
        )
        diagram.bar(
            lower[filled],
            np.abs(confidence - accuracy)[filled],
            bottom=np.minimum(confidence, accuracy)[filled],
            width=width,
            align="edge",
            fill=False,
            hatch="///",
            edgecolor="C3",
            linewidth=0.8,
            label="gap to the mean confidence",
        )
        for left, value, images in zip(lower[filled], accuracy[filled], count[filled], strict=True):
            inside = value >= 0.15  # the image count at the foot of the bar, or above a short one
            diagram.text(
                left + width / 2,
                0.015 if inside else value + 0.015,
                f"{int(images):,}",
                ha="center",
                va="bottom",
                fontsize=6.5,
                rotation=90,
                color="white" if inside else "black",
            )
        diagram.set_xlim(0, 1)
        diagram.set_ylim(0, 1.05)
        diagram.set_ylabel("accuracy")
        diagram.set_title(
            f"{name}\nECE {summary.ece:.4f}, MCE {summary.mce:.4f}, NLL {summary.nll:.4f}, Brier {summary.brier:.4f}",
            fontsize=10,
        )
        diagram.legend(loc="upper left", fontsize="small")
        diagram.grid(alpha=0.3)
        histogram.bar(lower, count / max(1, count.sum()), width=width, align="edge", color="C0", edgecolor="white")
        histogram.axvline(summary.accuracy, color="C2", linestyle="-", label=f"accuracy {summary.accuracy:.4f}")
        mean_confidence = float(summary.bins["confidence"].sum()) / max(1, summary.images)
        histogram.axvline(mean_confidence, color="C3", linestyle=":", label=f"mean confidence {mean_confidence:.4f}")
        histogram.set_xlabel(f"top-1 confidence ({bins} bins, {summary.images:,} images)")
        histogram.set_ylabel("share of images")
        histogram.legend(loc="upper left", fontsize="small")
        histogram.grid(alpha=0.3)
    figure.suptitle("Calibration" + (f" {subtitle}" if subtitle else ""))
    return figure
