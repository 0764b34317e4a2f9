"""`fmnist` / `python -m fmnist_lightning`: Lightning's CLI over the model and the data module."""

import errno
import inspect
import logging
import os
import sys
import tempfile
import time
import warnings
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn

from fmnist_lightning.callbacks import KeepLastCheckpoint, PredictionWriter, RandomState
from fmnist_lightning.checkpoints import ensure_checkpoint_fits, find_run_checkpoint, load_checkpoint
from fmnist_lightning.curves import FORMATS, draw_curves
from fmnist_lightning.data import DEFAULT_DATA_DIR, FashionMNISTDataModule
from fmnist_lightning.errors import UserError
from fmnist_lightning.export import FORMATS as EXPORT_FORMATS
from fmnist_lightning.export import export_checkpoint
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.runtime import configure_runtime, fastest_precision

DEBUG_ENV = "FMNIST_DEBUG"
CLI_DESCRIPTION = (
    "Train, evaluate and inspect the original Keras Fashion-MNIST CNN with Lightning. Besides the "
    "subcommands below: `fmnist plot RUN` draws a run's curves, `fmnist export --ckpt_path CKPT` writes "
    "ONNX or TorchScript."
)
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class FashionMNISTCLI(LightningCLI):
    """LightningCLI with safe checkpoints, `--test_after_fit`, and a summary of where a run left its files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: test the best checkpoint on the official test set once training ends",
        )
        parser.add_argument(
            "--tta",
            type=bool,
            default=False,
            help="test/predict: test-time augmentation, averaging each image's probabilities with its mirror image's",
        )
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # --predictions.output/format/top_k
        # Checkpoints are saved atomically and loaded without running pickled code, whatever the config.
        parser.set_defaults({"trainer.plugins": [{"class_path": "fmnist_lightning.checkpoints.SafeCheckpointIO"}]})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Also choose the precision where the config leaves it unset (`fastest_precision`), resolve
        `--ckpt_path last|best` to the newest run's file, and check the checkpoint before LightningCLI
        reads the model's settings from it. Resuming `fit` from a run's checkpoint continues that run's
        folder (same metrics.csv, same checkpoints/)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config and config.trainer.precision is None:  # unset: the fastest for this machine
            config.trainer.precision = fastest_precision(config.trainer.accelerator)
        ckpt_path = config.get("ckpt_path") if config else None
        if ckpt_path in ("last", "best"):
            ckpt_path = config["ckpt_path"] = str(find_run_checkpoint(runs_root(config.trainer.logger), ckpt_path))
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS:
            return
        settings = set(load_checkpoint(ckpt_path).get("hyper_parameters") or {}) - {"_instantiator"}
        unknown = settings - set(inspect.signature(FashionMNISTClassifier).parameters)
        if unknown:
            raise UserError(
                f"{ckpt_path} belongs to another model (settings {', '.join(sorted(unknown))}); "
                "use a checkpoint saved by this project"
            )
        if subcommand == "fit":
            continue_run_folder(config.trainer.logger, Path(ckpt_path))

    def after_instantiate_classes(self) -> None:
        self.model.test_time_augmentation = bool(self._get(self.config, "tta"))
        for logger in self.trainer.loggers:
            if getattr(logger, "root_dir", None):
                ensure_writable_folder(Path(logger.root_dir))
        ckpt_path = self._get(self.config, "ckpt_path") if self.subcommand else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS:
            checkpoint = load_checkpoint(ckpt_path)
            ensure_checkpoint_fits(checkpoint, self.model, ckpt_path)
            if self.model.test_time_augmentation and not trained_with_flips(checkpoint):
                print(
                    f"fmnist: warning: {ckpt_path} was trained without data.flip, so its mirror images are new "
                    "to it and --tta usually lowers accuracy (README, Improvements)",
                    file=sys.stderr,
                )

    def predict(self, **kwargs: Any) -> None:
        """Lightning's predict, streaming: results go to the PredictionWriter, not into a list in memory."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def after_predict(self) -> None:
        writers = [callback for callback in self.trainer.callbacks if isinstance(callback, PredictionWriter)]
        if writers and sum(writer.predicted for writer in writers) == 0:
            failed = sum(writer.failed for writer in writers)
            raise UserError(
                f"nothing could be predicted: all {failed} inputs failed (reasons in {writers[0].path}); "
                "check the paths given to --data.predict_paths"
            )

    def after_fit(self) -> None:
        scores = dict(self.trainer.callback_metrics)
        if self.config.fit.test_after_fit:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
            scores.update(self.trainer.callback_metrics)
        self._print_summary(scores)

    def after_test(self) -> None:
        self._print_summary(self.trainer.callback_metrics)

    def after_validate(self) -> None:
        self._print_summary(self.trainer.callback_metrics)

    def _print_summary(self, scores: Mapping[str, Any]) -> None:
        summary = run_summary(self.trainer, scores)  # every process: trainer.log_dir is a collective call
        if self.trainer.is_global_zero:
            print(summary, flush=True)


def trained_with_flips(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the run that saved `checkpoint` mirrored its training images (`data.flip`)."""
    return bool((checkpoint.get("datamodule_hyper_parameters") or {}).get("flip"))


def ensure_writable_folder(folder: Path) -> None:
    """Refuse, before anything runs, an output folder that cannot be created or written to.

    Checks the deepest existing part of the path without creating anything: a failing run must not
    leave empty folders behind.
    """
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to the output folder {folder}: {error.strerror}; "
            "choose another with --trainer.logger.init_args.save_dir"
        ) from error


def _logger_settings(logger: Any) -> Any:
    """The init_args of the (first) configured logger, or None for `logger: false/true`."""
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return None if logger is None or isinstance(logger, bool) else logger.get("init_args")


def runs_root(logger: Any) -> Path:
    """The folder holding a logger's version_N run folders: save_dir/name."""
    settings = _logger_settings(logger)
    if settings is None or settings.get("save_dir") is None:
        raise UserError("--ckpt_path last/best needs a logger with a save_dir (as in configs/base.yaml)")
    return Path(settings.save_dir) / (settings.get("name") or "")


def continue_run_folder(logger: Any, checkpoint: Path) -> None:
    """When resuming from runs/NAME/version_N/checkpoints/*.ckpt, log into version_N again."""
    settings = _logger_settings(logger)
    folder = checkpoint.resolve().parent
    if settings is None or settings.get("save_dir") is None or folder.name != "checkpoints":
        return
    if folder.parent.parent == runs_root(logger).resolve() and folder.parent.name.startswith("version_"):
        version = folder.parent.name.removeprefix("version_")
        settings.version = int(version) if version.isdigit() else folder.parent.name


def run_summary(trainer: Trainer, scores: Mapping[str, Any]) -> str:
    """A few lines saying where the run's logs, checkpoints and scores are."""
    lines = []
    if trainer.log_dir is not None:
        lines.append(f"run folder:       {trainer.log_dir}")
        metrics_file = Path(trainer.log_dir) / "metrics.csv"
        if metrics_file.is_file():
            lines.append(f"metrics log:      {metrics_file}")
    checkpoint = trainer.checkpoint_callback
    if trainer.state.fn == TrainerFn.FITTING or (checkpoint is not None and checkpoint.last_model_path):
        if checkpoint is not None and checkpoint.best_model_path:
            lines.append(f"best checkpoint:  {checkpoint.best_model_path}")
        if checkpoint is not None and checkpoint.last_model_path:
            lines.append(f"last checkpoint:  {checkpoint.last_model_path}")
    elif trainer.ckpt_path:
        lines.append(f"checkpoint:       {trainer.ckpt_path}")
    timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
    if timer is not None and timer.start_time() is not None:  # this command trained
        # This command's own time: Timer.time_elapsed() adds the time saved in the checkpoint last loaded,
        # which --test_after_fit's best checkpoint is.
        seconds = (timer.end_time() or time.monotonic()) - timer.start_time()
        lines.append(f"training time:    {seconds:.1f} s, validation included")
    for stage, label in (("val", "validation"), ("test", "test")):
        if f"{stage}_acc" in scores:
            lines.append(
                f"{label + ':':<17} accuracy {float(scores[f'{stage}_acc']):.4f}, "
                f"loss {float(scores[f'{stage}_loss']):.4f}"
            )
    return "\n".join(lines)


def quiet_lightning_noise() -> None:
    """Drop Lightning's advertising tips and a torch deprecation warning that users cannot act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def plot_command(args: list[str]) -> None:
    """`fmnist plot RUN [RUN ...]`: accuracy and loss curves from CSV logs."""
    parser = ArgumentParser(prog="fmnist plot", description=plot_command.__doc__, exit_on_error=False)
    parser.add_argument("runs", nargs="+", help="run folders, metrics.csv files, or folders holding runs")
    parser.add_argument("--out", help="folder for the images (default: the run's folder, or the runs' parent)")
    parser.add_argument("--format", nargs="+", default=["png"], help=f"one or more of {', '.join(FORMATS)}")
    config = parser.parse_args(args)
    for path in draw_curves(config.runs, config.out, config.format):
        print(f"curves:           {path}")


def export_command(args: list[str]) -> None:
    """`fmnist export --ckpt_path CKPT`: ONNX or TorchScript, checked against PyTorch on the test set."""
    parser = ArgumentParser(prog="fmnist export", description=export_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to export (.ckpt)")
    parser.add_argument("--format", default="onnx", choices=tuple(EXPORT_FORMATS), help="onnx (default) or torchscript")
    parser.add_argument("--output", help="model file to write (default: beside the run's checkpoints folder)")
    parser.add_argument("--input_dtype", default="uint8", choices=("uint8", "float32"), help="pixels 0-255 or 0-1")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST folder, for the test-set check")
    config = parser.parse_args(args)
    model_path, metadata_path, check = export_checkpoint(
        config.ckpt_path, config.format, config.output, config.input_dtype, config.data_dir
    )
    print(f"exported:         {model_path}")
    print(f"description:      {metadata_path}")
    print(
        f"checked on {check['images']:,} test images: max probability difference {check['max_abs_difference']:.1e}, "
        f"same class for {check['argmax_agreement']:.2%}, accuracy {check['exported_accuracy']:.4f} "
        f"(PyTorch {check['pytorch_accuracy']:.4f})"
    )


TOOL_COMMANDS = {"plot": plot_command, "export": export_command}


def lightning_command(args: list[str] | None, extra_callbacks: Sequence[Callback] = ()) -> FashionMNISTCLI:
    """fit / validate / test / predict through LightningCLI; `extra_callbacks` join the configured ones."""
    configure_runtime()
    # Parse errors raise instead of printing the whole usage, so that they too become one line.
    parser_kwargs = {"description": CLI_DESCRIPTION, "exit_on_error": False}
    parser_kwargs.update({name: {"exit_on_error": False} for name in LIGHTNING_SUBCOMMANDS})
    return FashionMNISTCLI(
        FashionMNISTClassifier,
        FashionMNISTDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        auto_configure_optimizers=False,  # the optimizer is the model's own `model.optimizer` setting
        # Always there, whatever the config: exact resumes need the random state and a current last.ckpt
        # (also on SIGTERM, which schedulers send), the summary states the training time.
        trainer_defaults={"callbacks": [RandomState(), KeepLastCheckpoint(), Timer(), *extra_callbacks]},
    )


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a UserError is one line on stderr and exit status 2 (FMNIST_DEBUG=1: a traceback)."""
    quiet_lightning_noise()
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in TOOL_COMMANDS:
            TOOL_COMMANDS[argv[0]](argv[1:])
        else:
            lightning_command(args)
            end_distributed_run()
    except (UserError, ArgumentError) as error:
        if os.environ.get(DEBUG_ENV):
            raise
        message = str(error) if isinstance(error, UserError) else describe_parse_error(str(error))
        print(f"fmnist: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def end_distributed_run() -> None:
    """Shut a DDP run's process group down in every process before the interpreter exits.

    Left to the exit-time destructors, gloo's threads can abort a process that has finished its work
    ("terminate called without an active exception", exit status -6), failing a run that succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def describe_parse_error(message: str) -> str:
    """jsonargparse's message, made fit for one line and pointed at the help."""
    if message.startswith("Unexpected config:"):
        message = "the --config file is not a YAML mapping of options"
    elif len(message) > 300:
        message = message[:300] + "..."
    return f"{message} (see `fmnist SUBCOMMAND --help` for the options)"
