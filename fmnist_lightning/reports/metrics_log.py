"""Reading Lightning CSVLogger's `metrics.csv` as one value per metric per epoch: train, val and test
land on separate rows, `_step`/`_epoch` columns split a metric, and a resumed run may log an epoch twice."""

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_lightning.errors import UserError

METRICS_FILE = "metrics.csv"
EPOCH_SUFFIX = "_epoch"
STEP_SUFFIX = "_step"
CURVE_STAGES = ("train", "val")


class NoCurvesError(UserError):
    """A log without per-epoch train or validation metrics (a test-only run, or one stopped early)."""


@dataclass
class RunMetrics:
    """One run's metrics: `epochs[name]` maps epoch (0-based) to value, `final[name]` holds test scores."""

    name: str
    path: Path
    epochs: dict[str, dict[int, float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """Epochs (0-based, ascending) and values of one per-epoch metric; empty if never logged."""
        points = sorted(self.epochs.get(name, {}).items())
        return [epoch for epoch, _ in points], [value for _, value in points]

    def non_finite(self) -> dict[str, list[int]]:
        """Per-epoch metrics that hold NaN or inf, with those epochs (0-based): a plot cannot draw them."""
        found = {name: [epoch for epoch, value in sorted(values.items()) if not math.isfinite(value)]
                 for name, values in self.epochs.items()}  # fmt: skip
        return {name: epochs for name, epochs in found.items() if epochs}


def metrics_files(path: str | os.PathLike) -> list[Path]:
    """The metrics files a user may mean by `path`: the file itself, a run folder, or a folder of runs."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder, its {METRICS_FILE}, or a folder of runs")
    if path.is_file():
        return [path]
    files = sorted(path.rglob(METRICS_FILE))
    if not files:
        raise UserError(f"no {METRICS_FILE} under {path}; give a run folder written by a CSVLogger")
    return files


def read_run(metrics_file: Path, name: str | None = None) -> RunMetrics:
    """Parse one Lightning CSV log; a later row for the same epoch replaces an earlier one (resumed runs)."""
    run = RunMetrics(name=name or run_name(metrics_file), path=metrics_file)
    for row in _rows(metrics_file):
        epoch = _epoch_of(row, metrics_file)
        if epoch is None:
            continue
        for column, cell in row.items():
            if column in ("epoch", "step") or column.endswith(STEP_SUFFIX) or not cell:
                continue
            metric = column.removesuffix(EPOCH_SUFFIX)
            value = _number(cell, column, metrics_file)
            if metric.startswith("test_"):
                run.final[metric] = value
            else:
                run.epochs.setdefault(metric, {})[epoch] = value
    if not any(name.startswith(CURVE_STAGES) for name in run.epochs):
        raise NoCurvesError(
            f"{metrics_file} has no per-epoch train or validation metrics to plot; "
            "was the run stopped before its first epoch ended?"
        )
    return run


def run_name(metrics_file: Path) -> str:
    """`base/version_0` for runs/base/version_0/metrics.csv: the logger's name and version."""
    return "/".join(metrics_file.parent.parts[-2:])


def _rows(metrics_file: Path) -> list[dict[str, str]]:
    try:
        with open(metrics_file, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read {metrics_file}: {error}") from error
    if "epoch" not in columns or "step" not in columns:
        raise UserError(
            f"{metrics_file} is not a Lightning CSVLogger log (no 'epoch' and 'step' columns); "
            "give the metrics.csv of a run"
        )
    return rows


def _epoch_of(row: dict[str, str], metrics_file: Path) -> int | None:
    cell = row.get("epoch") or ""
    if not cell:
        return None
    try:
        return int(float(cell))
    except ValueError:
        raise UserError(f"{metrics_file} has a row with epoch {cell!r}; is the file damaged?") from None


def _number(cell: str, column: str, metrics_file: Path) -> float:
    try:
        return float(cell)
    except ValueError:
        raise UserError(f"{metrics_file}: column {column!r} holds {cell!r}, not a number") from None
