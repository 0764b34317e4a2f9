"""Pictures of attribution maps: a map over its image (`overlay_rgb`, the demo's too), one image explained, a
sheet of many, and the deletion curves. Pure functions; the figures are built without pyplot, as in plots.py."""

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from fmnist_lightning.reports.faithfulness import Faithfulness
from fmnist_lightning.reports.plots import DPI

HEATMAP_COLORS = "jet"
# Colour weight where the map is highest; where it is zero the grayscale picture shows as it is.
OVERLAY_STRENGTH = 0.7
METHOD_NAMES = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients", "occlusion": "Occlusion"}


def normalized_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """The positive part of a map scaled to [0, 1] (all zeros for a map with nothing positive)."""
    positive = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    top = positive.max()
    return positive / top if top > 0 else positive


def overlay_rgb(pixels: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8: the map, normalised to [0, 1] and coloured, blended over the grayscale picture (H x W
    uint8) in proportion to its value, so the picture stays visible where the map says nothing."""
    heat = normalized_heatmap(heatmap)[..., None]
    gray = np.repeat(np.asarray(pixels, dtype=np.float64)[..., None] / 255, 3, axis=2)
    colored = colormaps[HEATMAP_COLORS](heat[..., 0])[..., :3]
    blended = (1 - OVERLAY_STRENGTH * heat) * gray + OVERLAY_STRENGTH * heat * colored
    return np.round(blended * 255).astype(np.uint8)


def explanation_figure(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    top_classes: Sequence[tuple[str, float]],
    title: str,
    method_label: str,
    true_class: str | None = None,
) -> Figure:
    """One image explained: the 28x28 input, the map over it, and the top classes with their probabilities
    (the true class named when known)."""
    figure = Figure(figsize=(8.4, 3.0), dpi=DPI, layout="constrained")
    picture, overlay, bars = figure.subplots(1, 3, width_ratios=(1, 1, 1.3))
    picture.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    picture.set_title("input (28x28)", fontsize=9)
    overlay.imshow(overlay_rgb(pixels, heatmap), interpolation="nearest")
    overlay.set_title(method_label, fontsize=9)
    for axes in (picture, overlay):
        axes.axis("off")
    names = [name for name, _ in top_classes][::-1]
    values = [value for _, value in top_classes][::-1]
    colors = ["tab:green" if name == true_class else "tab:red" if true_class else "C0" for name in names]
    bars.barh(names, values, color=colors)
    for row, value in enumerate(values):
        bars.text(min(value + 0.02, 0.8), row, f"{value:.1%}", va="center", fontsize=8)
    bars.set_xlim(0, 1)
    bars.set_xlabel("probability")
    bars.set_title(f"true class: {true_class}" if true_class else "true class unknown", fontsize=9)
    figure.suptitle(title, fontsize=10)
    return figure


def explanation_sheet_figure(
    pixels: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    captions: Sequence[str],
    correct: Sequence[bool | None],
    title: str,
    columns: int = 4,
) -> Figure:
    """Many images, each as its input beside its map over it, captioned (green right, red wrong, black unknown)."""
    rows = max(1, -(-len(pixels) // columns))
    figure = Figure(figsize=(2.9 * columns, 1.75 * rows + 0.6), dpi=DPI, layout="constrained")
    cells = figure.subfigures(rows, columns, squeeze=False).ravel()
    for index, cell in enumerate(cells):
        if index >= len(pixels):
            continue
        picture, overlay = cell.subplots(1, 2)
        picture.imshow(pixels[index], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        overlay.imshow(overlay_rgb(pixels[index], heatmaps[index]), interpolation="nearest")
        for axes in (picture, overlay):
            axes.axis("off")
        color = {True: "tab:green", False: "tab:red", None: "black"}[correct[index]]
        cell.suptitle(captions[index], fontsize=7.5, color=color)
    figure.suptitle(title)
    return figure


def deletion_curve_figure(report: Faithfulness) -> Figure:
    """The mean probability of the predicted class as pixels are blacked out, in the attribution's order and in
    a random one, with both areas under the curves and the randomisation check's result."""
    figure = Figure(figsize=(6.4, 4.4), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    fractions = np.linspace(0, 1, len(report.attribution_curve))
    method = METHOD_NAMES[report.method] + (f" ({report.layer})" if report.layer else "")
    axes.plot(fractions, report.attribution_curve, marker="o", markersize=3, color="C3",
              label=f"{method} order: AUC {report.deletion_auc:.3f}")  # fmt: skip
    axes.plot(fractions, report.random_curve, marker="o", markersize=3, color="grey", linestyle="--",
              label=f"random order: AUC {report.random_auc:.3f}")  # fmt: skip
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("fraction of pixels set to black")
    axes.set_ylabel("mean probability of the class predicted on the intact image")
    verdict = "passed" if report.randomisation_passed else "FAILED"
    axes.set_title(
        f"Deletion curves on {report.images:,} test images (lower is more faithful)\nrandomisation check "
        f"{verdict}: Spearman {report.randomisation_spearman:.2f} (< {report.randomisation_threshold})",
        fontsize=10,
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    return figure
