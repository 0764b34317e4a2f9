"""`predict`'s results, streamed to CSV or JSON lines batch by batch (`--predictions.output/format/top_k`)."""

import contextlib
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import UserError
from fmnist_lightning.outputs import atomic_write, ensure_output_path, new_folders_removed_on_error
from fmnist_lightning.training.run_folders import run_folder


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
