"""A CSV logger that survives kills and resumes. Lightning's CSVLogger buffers rows (a kill loses them),
deletes `metrics.csv` in a reused run folder, and repeats epochs logged again after a resume."""

import csv
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from fmnist_lightning.outputs import atomic_write

BOOKKEEPING = ("epoch", "step")


class MergingExperimentWriter(ExperimentWriter):
    """Rewrites the whole file atomically on each save; a row replaces an earlier one of the same epoch and metrics."""

    def __init__(self, log_dir: str) -> None:
        self.rows: list[dict[str, Any]] = []
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Continue an existing metrics.csv instead of deleting it."""
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                self.rows = [{key: value for key, value in row.items() if value != ""} for row in reader]
                self.metrics_keys = list(reader.fieldnames or [])

    def save(self) -> None:
        if not self.metrics:
            return
        for row in self.metrics:
            self._merge(row)
        self.metrics = []
        self.metrics_keys = sorted({key for row in self.rows for key in row})
        with atomic_write(self.metrics_file_path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def _merge(self, row: dict[str, Any]) -> None:
        signature = _signature(row)
        for index, existing in enumerate(self.rows):
            if _signature(existing) == signature:
                self.rows[index] = row
                return
        self.rows.append(row)


def _signature(row: dict[str, Any]) -> tuple[str, frozenset[str]]:
    """What a row is about: its epoch (or, for rows logged without one, its step) and the metrics it holds."""
    position = f"epoch {int(float(row['epoch']))}" if "epoch" in row else f"step {int(float(row.get('step', -1)))}"
    return position, frozenset(key for key in row if key not in BOOKKEEPING)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger with `MergingExperimentWriter`, flushed at every logging call."""

    def __init__(self, save_dir: str | os.PathLike, name: str = "lightning_logs", version: int | str | None = None):
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> MergingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = MergingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
