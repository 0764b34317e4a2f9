"""Callbacks that leave pictures and reports in the run folder: curves after fit, evaluation after test."""

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import warn
from fmnist_lightning.reports.calibration import CalibrationMetric, CalibrationSummary, calibration_rows
from fmnist_lightning.reports.classification import (
    ClassificationReportMetric,
    ExampleCollector,
    PredictionExamples,
    confusion_rows,
    markdown_table,
    report_rows,
    row_normalised,
    write_csv,
)
from fmnist_lightning.reports.metrics_log import METRICS_FILE, NoCurvesError
from fmnist_lightning.training.run_folders import run_folder


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
                warn(
                    "no accuracy.png/loss.png: they are drawn from the CSV log, and no logger is a "
                    "CSVLogger; keep RunCSVLogger as trainer.logger and add others with --extra_loggers"
                )
            return
        csv_logger.save()  # flush rows still in memory
        metrics_file = Path(csv_logger.log_dir) / METRICS_FILE
        if not metrics_file.is_file():
            return
        from fmnist_lightning.reports.curves import draw_curves  # matplotlib only loads when there is something to draw

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
        from fmnist_lightning.reports.plots import (
            calibration_figure,
            confusion_matrix_figure,
            image_grid_figure,
            save_figure,
        )

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
