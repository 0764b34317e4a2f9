"""Callbacks that leave pictures and reports in the run folder: curves after fit, evaluation after test."""

import contextlib
import csv
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.atomic import atomic_write, ensure_output_path, new_folders_removed_on_error
from fmnist_lightning.checkpoints import what_is_kept
from fmnist_lightning.errors import UserError
from fmnist_lightning.evaluation import ExampleCollector, PredictionExamples
from fmnist_lightning.metrics_log import METRICS_FILE, NoCurvesError
from fmnist_lightning.reports import (
    ClassificationReportMetric,
    confusion_rows,
    markdown_table,
    report_rows,
    row_normalised,
    write_csv,
)


def run_folder(trainer: L.Trainer) -> Path:
    """The folder a run writes its logs to (the logger's version folder), where reports go too.

    Under DDP this is a collective call (rank 0 broadcasts its folder): every process must make it.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class CurvePlots(L.Callback):
    """Draw accuracy and loss per epoch from the run's CSV log (`accuracy.png`, `loss.png`).

    Drawn at the end of `fit`, and again after a `test` in the same run, to add the test score.
    """

    def __init__(self, formats: tuple[str, ...] = ("png",)) -> None:
        self.formats = formats

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with contextlib.suppress(NoCurvesError):  # a test-only run has no curves to draw
            self._draw(trainer)

    def _draw(self, trainer: L.Trainer) -> None:
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None or not trainer.is_global_zero:
            return
        csv_logger.save()  # flush rows still in memory
        metrics_file = Path(csv_logger.log_dir) / METRICS_FILE
        if not metrics_file.is_file():
            return
        from fmnist_lightning.curves import draw_curves  # matplotlib only loads when there is something to draw

        for path in draw_curves([metrics_file], formats=self.formats):
            print(f"curves:           {path}", flush=True)


class TestReport(L.Callback):
    """After `test`: confusion matrix, per-class report, most confident mistakes and sample predictions.

    Needs `test_step` to return `{"probabilities": ...}`. The matrix and report cover the whole test set
    under DDP (torchmetrics synchronises them); the pictures show the first process's share.
    """

    FILES: ClassVar[dict[str, str]] = {
        "confusion_png": "confusion_matrix.png",
        "confusion_csv": "confusion_matrix.csv",
        "confusion_normalized_csv": "confusion_matrix_normalized.csv",
        "report_csv": "per_class_report.csv",
        "mistakes_png": "most_confident_mistakes.png",
        "samples_png": "test_samples.png",
    }

    def __init__(self, gallery_size: int = 16, sample_size: int = 25) -> None:
        self.gallery_size = gallery_size
        self.sample_size = sample_size
        self.report_metric: ClassificationReportMetric | None = None
        self.examples: ExampleCollector | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report_metric = ClassificationReportMetric().to(pl_module.device)
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
        self.examples.update(images, labels, probabilities)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every process takes part in both collective calls (the metric's sync, the run folder's broadcast);
        # a collective call made by one process alone would wait for the others forever.
        report = self.report_metric.compute()
        folder = run_folder(trainer)
        if not trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        paths = {key: folder / name for key, name in self.FILES.items()}
        rows = report_rows(report)
        write_csv(rows, paths["report_csv"])
        write_csv(confusion_rows(report.confusion), paths["confusion_csv"])
        write_csv(confusion_rows(report.confusion, normalize=True), paths["confusion_normalized_csv"])
        self._draw(report.confusion, paths)
        print(f"\nPer-class report on the test set\n\n{markdown_table(rows)}\n", flush=True)
        for path in paths.values():
            print(f"report:           {path}", flush=True)

    def _draw(self, confusion: torch.Tensor, paths: dict[str, Path]) -> None:
        from fmnist_lightning.plots import confusion_matrix_figure, image_grid_figure, save_figure

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
    return f"true: {true_name}\npred: {predicted_name} ({float(examples.confidence[index]):.1%})"


class PredictionWriter(BasePredictionWriter):
    """Streams `predict` results to a CSV (or JSON lines) file batch by batch, never holding them all.

    One row per input: its path (or `test/INDEX` for the test set), the predicted class index and name
    with its probability, the `top_k` classes with probabilities, the true class where known, and the
    error for a file that could not be read. The file appears under its name only when complete.

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


class DivergenceGuard(L.Callback):
    """Stops a fit whose loss has blown up, before that state is saved as a checkpoint (best or last).

    Checked once per epoch, after validation and before any checkpoint callback: the epoch's mean
    training loss (summed on the device, step by step, without a host sync) and the validation loss
    must be finite and below `EXPLODED` times the loss of a uniform guess over the classes, which no
    run that is learning comes near. Mid-epoch, `SafeCheckpointIO` refuses non-finite weights and metric
    sums. The command then ends with one line, and the checkpoints of earlier epochs stay as they were.
    """

    EXPLODED = 100

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._steps = torch.zeros((), device=pl_module.device), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self._loss_sum is not None and isinstance(loss, torch.Tensor):
            self._loss_sum += loss.detach().float()
            self._steps += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self._loss_sum is None:
            return
        steps = trainer.strategy.reduce(torch.tensor(float(self._steps), device=pl_module.device), reduce_op="sum")
        train_loss = float(trainer.strategy.reduce(self._loss_sum, reduce_op="sum") / steps.clamp_min(1))
        losses = {"training loss": train_loss if self._steps else 0.0}
        if "val_loss" in trainer.callback_metrics:
            losses["validation loss"] = float(trainer.callback_metrics["val_loss"])
        limit = self.EXPLODED * math.log(len(CLASS_NAMES))
        for name, value in losses.items():
            if not math.isfinite(value) or value > limit:
                checkpoint = trainer.checkpoint_callback
                kept = what_is_kept(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint else "no checkpoint was saved"
                raise UserError(
                    f"training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: the epoch's "
                    f"{name} is {value:.3g}, over {self.EXPLODED}x a uniform guess's (is the learning rate too high?); "
                    f"stopped, {kept}"
                )


class RandomState(L.Callback):
    """Saves the global random number generators in checkpoints and restores them on resume.

    Dropout and batch augmentation draw from them; with their state restored, a run resumed from a
    checkpoint draws exactly what the uninterrupted run would have (the data order has its own seed).
    """

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state_dict["cuda"]))


SIGNAL_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"


class KeepLastCheckpoint(L.Callback):
    """Keeps `last.ckpt` at the latest state: after every epoch's validation, on SIGTERM and on Ctrl-C.

    Since Lightning 2.6, `ModelCheckpoint(save_last=True)` rewrites last.ckpt only when it saves a top-k
    checkpoint at the same step; with `save_top_k: 1` that is a new best epoch only, and a run killed
    later would resume from its best epoch and train the epochs after it once more. So once a
    ModelCheckpoint has written its last.ckpt, this callback rewrites that file after every validation of
    a fit (before the ModelCheckpoint's own turn: Lightning runs checkpoint callbacks last).

    On SIGTERM (what schedulers send before killing a job) Lightning stops at the end of the current
    batch, so the state saved there is consistent. A first Ctrl-C during training is turned into the same
    orderly stop (the process then exits 130); a second one stops at once.

    A run resumed from its own folder reached by another spelling (an absolute `save_dir`, a copied or
    moved run folder) keeps writing its own last.ckpt: the ModelCheckpoint's saved paths are moved to
    the folder it writes to now, instead of Lightning starting a `last-v1.ckpt` beside the old file. A
    checkpoint that is only scored (validate, test, predict) does not restore those paths at all.
    """

    def __init__(self) -> None:
        self.interrupted = False  # by Ctrl-C
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_at_batch_end)
            # Lightning logs the SIGTERM this class sends itself; the user pressed Ctrl-C.
            logging.getLogger(SIGNAL_LOGGER).addFilter(self._quiet_own_sigterm)

    def _quiet_own_sigterm(self, record: logging.LogRecord) -> bool:
        return not (self.interrupted and "Received SIGTERM" in record.getMessage())

    def _stop_at_batch_end(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the batch to end
        self.interrupted = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's orderly stop at the end of the batch

    def _restore_sigint(self) -> None:
        logging.getLogger(SIGNAL_LOGGER).removeFilter(self._quiet_own_sigterm)
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resumed_from = Path(trainer.ckpt_path or "").resolve().parent
        for callback in trainer.checkpoint_callbacks:
            if trainer.state.fn != TrainerFn.FITTING:  # only scored: its saved paths belong to the run that wrote it
                checkpoint.get("callbacks", {}).pop(callback.state_key, None)
                continue
            state = checkpoint.get("callbacks", {}).get(callback.state_key)
            if not state or not callback.dirpath or Path(callback.dirpath).resolve() != resumed_from:
                continue
            old, new = state.get("dirpath"), callback.dirpath
            if not old or old == new:
                continue

            def moved(path: Any, old: Any = old, new: str = new) -> Any:
                return str(Path(new) / Path(path).name) if path and Path(path).parent == Path(old) else path

            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state[key] = moved(state.get(key))
            state["best_k_models"] = {moved(path): score for path, score in state.get("best_k_models", {}).items()}
            state["dirpath"] = new

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        # Its own file name, so that the ModelCheckpoint does not take the file for another's and write last-v1.
        if fitting and checkpoint is not None and checkpoint.save_last and checkpoint.last_model_path:
            trainer.save_checkpoint(checkpoint.last_model_path, weights_only=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        checkpoint = trainer.checkpoint_callback
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not isinstance(exception, SIGTERMException) or not fitting or checkpoint is None:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        cause = "interrupted (Ctrl-C)" if self.interrupted else "received SIGTERM"
        if trainer.training:
            trainer.save_checkpoint(path, weights_only=False)
            what = f"saved {path}"
        else:  # during validation: last.ckpt holds the end of the epoch's training or an earlier state
            what = f"{path} holds the last saved state"
        config = run_folder(trainer) / "config.yaml"  # every process: a collective call under DDP
        if trainer.is_global_zero:
            how = f"fmnist fit --config {config} --ckpt_path {path}"
            print(f"{cause}: {what}; resume with `{how}`", flush=True)
