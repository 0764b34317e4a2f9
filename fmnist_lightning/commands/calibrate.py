"""`fmnist calibrate --ckpt_path CKPT`: one temperature fitted on the checkpoint's own validation split, saved in a
new checkpoint with its reliability diagrams beside it; never over the checkpoint it reads."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from fmnist_lightning.data.batches import TensorBatchDataset, in_batches
from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_write, ensure_output_path
from fmnist_lightning.reports.calibration import CalibrationSummary, fit_temperature, summarize
from fmnist_lightning.training.settings import Kind, data_settings


def calibrate_command(args: list[str]) -> None:
    """`fmnist calibrate --ckpt_path CKPT`: fit a temperature on the validation split, save a new checkpoint."""
    parser = ArgumentParser(prog="fmnist calibrate", description=calibrate_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to calibrate (.ckpt); it is never changed")
    parser.add_argument("--output", help="checkpoint to write (default: CKPT's name with -calibrated, beside it)")
    parser.add_argument("--data_dir", help="Fashion-MNIST folder (default: the checkpoint's run's data.data_dir)")
    parser.add_argument("--system_dir", help="the system's copy of the files (default: the run's data.system_dir)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing --output and its diagrams")
    config = parser.parse_args(args)
    result = calibrate_checkpoint(config.ckpt_path, config.output, config.data_dir, config.system_dir, config.overwrite)
    print(f"temperature:      {result.temperature:.4f} (fitted on {result.validation_images:,} validation images)")
    for label, summary in (("test before:", result.before), ("test after:", result.after)):
        print(
            f"{label:<17} accuracy {summary.accuracy:.4f}, ECE {summary.ece:.4f}, NLL {summary.nll:.4f}, "
            f"Brier {summary.brier:.4f}"
        )
    print(f"calibrated:       {result.checkpoint}")
    print(f"diagrams:         {result.figure}")


# The data settings that decide which images are the checkpoint's validation split, and where they are.
SPLIT_DATA_SETTINGS = data_settings(Kind.SPLIT, Kind.LOCATION)


@torch.no_grad()
def logits_of(model: FashionMNISTClassifier, split: TensorBatchDataset) -> torch.Tensor:
    """float32 logits of a whole split, before any temperature (the model in eval mode on the CPU)."""
    return in_batches(lambda images: model(images).float(), split.images)


@dataclass
class CalibrationResult:
    """What `fmnist calibrate` fitted and measured, and the files it wrote."""

    temperature: float
    validation_images: int
    before: CalibrationSummary  # on the test set, with the checkpoint's own temperature
    after: CalibrationSummary
    checkpoint: Path
    figure: Path


def calibrate_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    data_dir: str | None = None,
    system_dir: str | None = None,
    overwrite: bool = False,
) -> CalibrationResult:
    """Fit the temperature on the checkpoint's own validation split; write a new checkpoint carrying it, and
    its diagrams beside it (same name, .png): both or neither."""
    model, checkpoint = FashionMNISTClassifier.from_checkpoint(ckpt_path)
    path = Path(ckpt_path)
    destination = Path(output) if output else path.with_name(f"{path.stem}-calibrated.ckpt")
    figure_path = destination.with_suffix(".png")
    check_calibration_outputs(path, destination, figure_path, overwrite)
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    settings: dict[str, Any] = {name: saved[name] for name in SPLIT_DATA_SETTINGS if name in saved}
    settings |= {name: value for name, value in (("data_dir", data_dir), ("system_dir", system_dir)) if value}
    data = FashionMNISTDataModule(**settings, data_on_device=False)
    data.prepare_data()
    data.setup("validate")
    data.setup("test")
    val_logits = logits_of(model, data.val_set)
    temperature = fit_temperature(val_logits, data.val_set.labels)
    test_logits, test_labels = logits_of(model, data.test_set), data.test_set.labels
    before = summarize((test_logits / model.hparams.temperature).softmax(dim=1), test_labels)
    after = summarize((test_logits / temperature).softmax(dim=1), test_labels)

    from fmnist_lightning.reports.plots import calibration_figure, write_figure  # matplotlib only when drawing

    panels = {"before": before, f"after (temperature {temperature:.3f})": after}
    figure = calibration_figure(panels, "on the test set, temperature fitted on the validation split")
    checkpoint["hyper_parameters"]["temperature"] = temperature
    # Both under temporary names until both are complete; the checkpoint is renamed into place first.
    with atomic_write(figure_path) as figure_file, atomic_write(destination) as checkpoint_file:
        write_figure(figure, figure_file, "png")
        torch.save(checkpoint, checkpoint_file)
    return CalibrationResult(temperature, len(data.val_set), before, after, destination, figure_path)


def check_calibration_outputs(source: Path, destination: Path, figure: Path, overwrite: bool) -> None:
    """Refuse, before any work, outputs that would replace the checkpoint being read, collide with each other,
    or replace an existing file unasked. Files are compared as files (device and inode), not as path strings,
    so `x/../x/a.ckpt` and a path through a linked folder are seen for what they are."""
    if destination.suffix != ".ckpt":
        raise UserError(
            f"--output {destination}: a calibrated checkpoint is a .ckpt file (its diagrams go beside it as "
            f"{figure.name}); give a name ending in .ckpt"
        )
    if same_file(destination, source):
        raise UserError(
            f"--output {destination} is the checkpoint being calibrated ({source}); it is never changed, choose another"
        )
    if same_file(figure, source):
        raise UserError(f"--output {destination}: its diagrams {figure} would replace {source}; choose another")
    for option, output in (("--output", destination), ("its diagrams", figure)):
        ensure_output_path(output, "--output")
        if output.exists() and not overwrite:
            raise UserError(f"{output} exists ({option}); give another --output, or --overwrite true to replace it")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, however they reach it (links, `..`); False if either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
