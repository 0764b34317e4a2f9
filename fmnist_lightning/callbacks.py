"""Callbacks that leave pictures and reports in the run folder: curves after fit, evaluation after test."""

import contextlib
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.calibration import CalibrationMetric, CalibrationSummary, calibration_rows
from fmnist_lightning.errors import UserError
from fmnist_lightning.metrics_log import METRICS_FILE, NoCurvesError
from fmnist_lightning.outputs import atomic_write, ensure_output_path, new_folders_removed_on_error
from fmnist_lightning.reports import (
    ClassificationReportMetric,
    ExampleCollector,
    PredictionExamples,
    confusion_rows,
    markdown_table,
    report_rows,
    row_normalised,
    write_csv,
)
from fmnist_lightning.run_folders import run_folder


class CurvePlots(L.Callback):
    """Draw accuracy and loss per epoch from the run's CSV log (`accuracy.png`, `loss.png`) after `fit`,
    and again after a `test` in the same run to add the test score."""

    def __init__(self, formats: tuple[str, ...] = ("png",)) -> None:
        self.formats = formats

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with contextlib.suppress(NoCurvesError):  # a test-only run has no curves to draw
            self._draw(trainer)

    def _draw(self, trainer: L.Trainer) -> None:
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if not trainer.is_global_zero:
            return
        if csv_logger is None:
            if trainer.loggers and trainer.state.fn == TrainerFn.FITTING:  # once, after fit (test runs draw no curves)
                print(
                    "fmnist: warning: no accuracy.png/loss.png: they are drawn from the CSV log, and no logger is a "
                    "CSVLogger; keep RunCSVLogger as trainer.logger and add others with --extra_loggers",
                    file=sys.stderr,
                )
            return
        csv_logger.save()  # flush rows still in memory
        metrics_file = Path(csv_logger.log_dir) / METRICS_FILE
        if not metrics_file.is_file():
            return
        from fmnist_lightning.curves import draw_curves  # matplotlib only loads when there is something to draw

        for path in draw_curves([metrics_file], formats=self.formats):
            print(f"curves:           {path}", flush=True)


class TestReport(L.Callback):
    """After `test`: confusion matrix, per-class and calibration reports, most confident mistakes, sample
    predictions; logs `test_ece`. Needs `test_step` to return `{"probabilities": ...}`; under DDP the
    galleries show only rank 0's share."""

    FILES: ClassVar[dict[str, str]] = {
        "confusion_png": "confusion_matrix.png",
        "confusion_csv": "confusion_matrix.csv",
        "confusion_normalized_csv": "confusion_matrix_normalized.csv",
        "report_csv": "per_class_report.csv",
        "mistakes_png": "most_confident_mistakes.png",
        "samples_png": "test_samples.png",
        "calibration_png": "calibration.png",
        "calibration_csv": "calibration.csv",
    }

    def __init__(self, gallery_size: int = 16, sample_size: int = 25) -> None:
        self.gallery_size = gallery_size
        self.sample_size = sample_size
        self.report_metric: ClassificationReportMetric | None = None
        self.examples: ExampleCollector | None = None
        self.calibration: CalibrationMetric | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report_metric = ClassificationReportMetric().to(pl_module.device)
        self.calibration = CalibrationMetric().to(pl_module.device)
        self.examples = ExampleCollector(self.gallery_size, self.sample_size)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, labels = batch
        probabilities = outputs["probabilities"]
        self.report_metric.update(probabilities, labels)
        self.calibration.update(probabilities, labels)
        self.examples.update(images, labels, probabilities)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every process must join both collective calls (metric sync, run-folder broadcast) or the others hang
        report = self.report_metric.compute()
        calibration = self.calibration.compute()
        folder = run_folder(trainer)
        pl_module.log("test_ece", calibration.ece)  # the same value in every process: already synchronised
        if not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        paths = {key: folder / name for key, name in self.FILES.items()}
        rows = report_rows(report)
        write_csv(rows, paths["report_csv"])
        write_csv(confusion_rows(report.confusion), paths["confusion_csv"])
        write_csv(confusion_rows(report.confusion, normalize=True), paths["confusion_normalized_csv"])
        write_csv(calibration_rows(calibration), paths["calibration_csv"])
        self._draw(report.confusion, calibration, paths)
        print(f"\nPer-class report on the test set\n\n{markdown_table(rows)}\n", flush=True)
        for path in paths.values():
            print(f"report:           {path}", flush=True)

    def _draw(self, confusion: torch.Tensor, calibration: CalibrationSummary, paths: dict[str, Path]) -> None:
        from fmnist_lightning.plots import calibration_figure, confusion_matrix_figure, image_grid_figure, save_figure

        save_figure(calibration_figure({"test set": calibration}), paths["calibration_png"])

        save_figure(
            confusion_matrix_figure(confusion.numpy(), row_normalised(confusion).numpy(), CLASS_NAMES),
            paths["confusion_png"],
        )
        mistakes, samples = self.examples.mistakes, self.examples.samples
        save_figure(
            image_grid_figure(
                mistakes.images[:, 0].numpy(),
                [_caption(mistakes, i) for i in range(len(mistakes))],
                [False] * len(mistakes),
                f"The {len(mistakes)} most confident mistakes (true class, then prediction)",
                columns=4,
            ),
            paths["mistakes_png"],
        )
        save_figure(
            image_grid_figure(
                samples.images[:, 0].numpy(),
                [_caption(samples, i) for i in range(len(samples))],
                (samples.labels == samples.predicted).tolist(),
                f"The first {len(samples)} test images and their predictions (red: wrong)",
            ),
            paths["samples_png"],
        )


def _caption(examples: PredictionExamples, index: int) -> str:
    true_name = CLASS_NAMES[int(examples.labels[index])]
    predicted_name = CLASS_NAMES[int(examples.predicted[index])]
    return f"true: {true_name}\npred: {predicted_name} ({percent(float(examples.confidence[index]))})"


def percent(probability: float) -> str:
    """A percentage with as many decimals as it takes not to round a probability below 1 up to 100%."""
    decimals = 1
    while probability < 1 and round(probability * 100, decimals) >= 100 and decimals < 6:
        decimals += 1
    return f"{probability:.{decimals}%}"


class PredictionWriter(BasePredictionWriter):
    """Streams `predict` results to CSV or JSON lines batch by batch, never holding them all in memory;
    the file appears under its name only when complete.

    Args:
        output: File to write; default `predictions.csv` (or `.jsonl`) in the run folder.
        format: "csv" or "jsonl".
        top_k: How many classes to list per image, most probable first.
    """

    def __init__(self, output: str | None = None, format: Literal["csv", "jsonl"] = "csv", top_k: int = 3) -> None:
        super().__init__(write_interval="batch")
        if not 1 <= top_k <= len(CLASS_NAMES):
            raise UserError(f"top_k must be between 1 and {len(CLASS_NAMES)}, got {top_k}")
        self.output = output
        self.format = format
        self.top_k = top_k
        self.path: Path | None = None
        self.predicted = self.failed = 0
        self.first_failure = ""
        self._files = contextlib.ExitStack()
        self._write_row: Any = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output) if self.output else run_folder(trainer) / f"predictions.{self.format}"
        if trainer.world_size > 1:  # each process writes its share
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        ensure_output_path(path, "--predictions.output")
        try:
            self._files.enter_context(new_folders_removed_on_error(path.parent))
            path.parent.mkdir(parents=True, exist_ok=True)
            file = self._files.enter_context(atomic_write(path, "w", newline="", encoding="utf-8"))
        except OSError as error:
            self._files.__exit__(type(error), error, error.__traceback__)  # removes the folders it made
            raise UserError(f"cannot write predictions to {path}: {error.strerror}; choose another output") from error
        self.path, self.predicted, self.failed, self.first_failure = path, 0, 0, ""
        if self.format == "csv":
            writer = csv.DictWriter(file, fieldnames=self._columns())
            writer.writeheader()
            self._write_row = writer.writerow
        else:
            self._write_row = lambda row: file.write(json.dumps(row) + "\n")

    def _columns(self) -> list[str]:
        ranked = [f"top{rank}_{field}" for rank in range(1, self.top_k + 1) for field in ("class", "probability")]
        known = ["true_index", "true_class", "error"]
        return ["path", "predicted_index", "predicted_class", "probability", *ranked, *known]

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        probabilities, ranks = prediction["probabilities"].float().cpu().topk(self.top_k, dim=1)
        labels = prediction["labels"].tolist()
        # image files' batches carry their paths and errors after the images and labels
        paths = batch[2] if len(batch) > 2 else [f"test/{index}" for index in (batch_indices or [])]
        errors = batch[3] if len(batch) > 3 else [""] * len(labels)
        for row_index, (label, error) in enumerate(zip(labels, errors, strict=True)):
            row: dict[str, Any] = {"path": paths[row_index] if row_index < len(paths) else "", "error": error}
            if error:
                self.failed += 1
                self.first_failure = self.first_failure or f"{row['path']}: {error}"
            else:
                self.predicted += 1
                classes, values = ranks[row_index].tolist(), probabilities[row_index].tolist()
                row |= {"predicted_index": classes[0], "predicted_class": CLASS_NAMES[classes[0]]}
                row["probability"] = round(values[0], 6)
                for rank, (cls, value) in enumerate(zip(classes, values, strict=True), start=1):
                    row |= {f"top{rank}_class": CLASS_NAMES[cls], f"top{rank}_probability": round(value, 6)}
            if label >= 0:
                row |= {"true_index": label, "true_class": CLASS_NAMES[label]}
            self._write_row(row)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = torch.tensor([self.predicted, self.failed], device=pl_module.device)
        predicted, failed = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # over all processes
        if predicted == 0:  # a file of errors only is no result: leave nothing behind
            error = UserError(
                f"nothing could be predicted: all {failed} inputs failed (first: {self.first_failure}); "
                "check the paths given to --data.predict_paths"
            )
            self._files.__exit__(UserError, error, None)  # drops the partial file
            raise error
        self._files.close()  # renames the finished file into place
        failed_note = f", {self.failed} could not be read (see the error column)" if self.failed else ""
        print(f"predictions:      {self.path} ({self.predicted} predicted{failed_note})", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._files.__exit__(type(exception), exception, exception.__traceback__)  # drops the partial file
