"""`fmnist plot`: accuracy and loss curves of one run, or of several runs compared, as image files."""

import os
from collections.abc import Sequence
from pathlib import Path

from fmnist_lightning.errors import UserError, warn
from fmnist_lightning.outputs import ensure_output_path
from fmnist_lightning.reports.metrics_log import NoCurvesError, RunMetrics, metrics_files, read_run
from fmnist_lightning.reports.plots import CURVE_QUANTITIES, curve_figure, save_figure

CURVE_FILES = {"acc": "accuracy", "loss": "loss"}
FORMATS = ("png", "svg")


def draw_curves(
    runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """Draw accuracy and loss per epoch (several runs compared in one figure); return the files written.
    Every log is read and checked first, so bad input leaves no partial output."""
    if not runs:
        raise UserError("give at least one run folder, metrics.csv, or folder of runs")
    if unknown := sorted(set(formats) - set(FORMATS)):
        raise UserError(f"unknown image format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    metrics = _read_runs(runs)
    for run in metrics:
        for name, epochs in run.non_finite().items():
            listed = ", ".join(str(epoch + 1) for epoch in epochs)
            warn(
                f"{run.path}: {name} is NaN or inf at epoch{'s' if len(epochs) > 1 else ''} "
                f"{listed} (counted from 1); those points are left out of the curves"
            )
    destination = Path(out) if out is not None else _default_folder(metrics)
    ensure_output_path(destination, "--out", is_folder=True)
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for quantity in CURVE_QUANTITIES:
        if not any(run.series(f"{stage}_{quantity}")[0] for run in metrics for stage in ("train", "val")):
            continue
        figure = curve_figure(metrics, quantity)
        for image_format in formats:
            path = destination / f"{CURVE_FILES[quantity]}.{image_format}"
            save_figure(figure, path)
            written.append(path)
    return written


def _read_runs(paths: Sequence[str | os.PathLike]) -> list[RunMetrics]:
    """Read every log; inside a folder of several runs, logs with no curves (test-only runs) are skipped."""
    runs = {}
    for path in paths:
        files = metrics_files(path)
        for file in files:
            try:
                runs.setdefault(file, read_run(file))
            except NoCurvesError:
                if len(files) == 1:
                    raise
    if not runs:
        raise UserError(f"none of the logs under {', '.join(map(str, paths))} has per-epoch metrics to plot")
    return list(runs.values())


def _default_folder(metrics: Sequence[RunMetrics]) -> Path:
    run_folders = [run.path.parent for run in metrics]
    if len(run_folders) == 1:
        return run_folders[0]
    return Path(os.path.commonpath([folder.resolve() for folder in run_folders]))
