"""fit, validate, test and predict: LightningCLI over the model and the DataModule, with this project's
checkpoint policy (checked before LightningCLI reads a checkpoint), run folders, extra loggers and run summary."""

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.errors import STOPPED_EXIT_STATUS, Terminated, UserError, warn
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.predictions import PredictionWriter
from fmnist_lightning.training.checkpoints import load_checkpoint, load_weights
from fmnist_lightning.training.divergence import DivergenceGuard
from fmnist_lightning.training.loggers import ExtraLogger, extra_loggers
from fmnist_lightning.training.resume import (
    KeepLastCheckpoint,
    RandomState,
    RecipeConfig,
    RunSettings,
    keep_command_line_settings,
    recipe_differences,
    run_settings,
)
from fmnist_lightning.training.run_folders import (
    NewRunFolder,
    TakeBackRunFolders,
    claim_run_folder,
    continue_run_folder,
    find_run_checkpoint,
    remove_unfinished_run_folder,
    runs_root,
)
from fmnist_lightning.training.settings import MODEL_SETTINGS, SPLIT_SETTINGS
from fmnist_lightning.training.speed import configure_runtime, fastest_precision
from fmnist_lightning.training.threads import ThreadsForFreeCores

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
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # --predictions.output/format/top_k
        parser.add_argument(
            "--extra_loggers",
            type=list[ExtraLogger],
            default=[],
            help="Lightning loggers beside the CSV log, in the same run folder: tensorboard, mlflow",
        )
        # Checkpoints are saved atomically and loaded without running pickled code, whatever the config.
        parser.set_defaults(
            {"trainer.plugins": [{"class_path": "fmnist_lightning.training.checkpoints.SafeCheckpointIO"}]}
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Also fill in an unset precision, and resolve and check `--ckpt_path` (read once, here) before
        LightningCLI takes the model's settings from it, which imports the classes they name."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # none: `lr_find`, which runs no subcommand
        if config.trainer.precision is None:  # unset: the fastest for this machine
            config.trainer.precision = fastest_precision(config.trainer.accelerator)
        self.checkpoint: dict[str, Any] | None = None
        if subcommand:
            check_run_length(subcommand, config)
            self.given_model_settings = config.model.clone()  # before LightningCLI puts the checkpoint's over them
            self.checkpoint = checked_checkpoint(subcommand, config)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own step (it reads the file again with torch.load), from the checkpoint read above."""
        saved = (self.checkpoint or {}).get("hyper_parameters") or {}
        settings = {key: value for key, value in saved.items() if not key.startswith("_")}  # _instantiator
        if settings:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": settings}}, self.config)

    def before_instantiate_classes(self) -> None:
        if self.checkpoint is None or not self.subcommand:
            return
        defaults = FashionMNISTClassifier.default_settings()
        for warning in keep_command_line_settings(
            self.given_model_settings, self.config[self.subcommand].model, defaults
        ):
            warn(warning)

    def after_instantiate_classes(self) -> None:
        if self.checkpoint is not None:
            load_weights(self.model, self.checkpoint, self._get(self.config, "ckpt_path"))
            warn_about_tta(self.model, self.checkpoint, self._get(self.config, "ckpt_path"))
        if self.subcommand == "fit" and not self.datamodule.validating:
            train_without_validation(self.trainer)
        if self.subcommand:  # recorded by fit; there in every subcommand, as Lightning expects its state's owner
            self.trainer.callbacks.append(RunSettings(run_settings(self.config[self.subcommand])))
        # Last, once nothing else can refuse the command: the run folders it writes to, and the loggers beside.
        self.trainer.callbacks.append(claim_run_folders(self.trainer))
        add_extra_loggers(self.trainer, self._get(self.config, "extra_loggers"))

    def predict(self, **kwargs: Any) -> None:
        """Lightning's predict, streaming: results go to the PredictionWriter, not into a list in memory."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def after_fit(self) -> None:
        scores = dict(self.trainer.callback_metrics)
        if self.config.fit.test_after_fit:
            best = "best" if self.datamodule.validating else "last"  # no validation picks no best epoch
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
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


def check_run_length(subcommand: str, config: Any) -> None:
    max_epochs = config.trainer.max_epochs
    if subcommand == "fit" and max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise UserError(f"trainer.max_epochs must be at least 1 (or -1 for no limit), got {max_epochs}")


def checked_checkpoint(subcommand: str, config: Any) -> dict[str, Any] | None:
    """The checkpoint `--ckpt_path` names (`last`/`best` resolved in `config`), read once and checked: this
    project's model, a resume with the run's own settings, a validation on the run's own split."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path in ("last", "best"):
        ckpt_path = config["ckpt_path"] = str(find_run_checkpoint(runs_root(config.trainer.logger), ckpt_path))
    if not ckpt_path and subcommand != "fit":  # a freshly initialised model's scores mean nothing
        raise UserError(
            f"{subcommand} needs a trained model: give --ckpt_path with a .ckpt file, "
            "or `last`/`best` for the newest run's"
        )
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS:
        return None
    checkpoint = load_checkpoint(ckpt_path)
    if unknown := set(checkpoint.get("hyper_parameters") or {}) - set(MODEL_SETTINGS) - {"_instantiator"}:
        raise UserError(
            f"{ckpt_path} belongs to another model (settings {', '.join(sorted(unknown))}); "
            "use a checkpoint saved by this project"
        )
    if subcommand == "fit":
        if differences := recipe_differences(config, checkpoint):
            raise UserError(
                f"cannot resume from {ckpt_path} with other settings than its run's: {'; '.join(differences)}; "
                "resume with the run's own settings (its config.yaml), or leave out --ckpt_path for a new run"
            )
        continue_run_folder(config.trainer.logger, Path(ckpt_path))
    if subcommand == "validate" and (differences := recipe_differences(config, checkpoint, SPLIT_SETTINGS)):
        raise UserError(
            f"refusing to validate {ckpt_path} on another split than its run's ({'; '.join(differences)}): "
            "the validation images would include images it trained on; keep its split settings"
        )
    return checkpoint


def warn_about_tta(model: FashionMNISTClassifier, checkpoint: Mapping[str, Any], ckpt_path: str) -> None:
    if model.test_time_augmentation and not (checkpoint.get("datamodule_hyper_parameters") or {}).get("flip"):
        warn(
            f"{ckpt_path} was trained without data.flip, so its mirror images are new "
            "to it and --model.tta usually lowers accuracy (docs/improvements.md)"
        )


def claim_run_folders(trainer: Trainer) -> TakeBackRunFolders:
    """Claim each logger's new run folder now; the callback returned takes them back if the command fails."""
    claimed: list[NewRunFolder | None] = []
    try:
        for logger in trainer.loggers:
            claimed.append(claim_run_folder(logger))
    except BaseException:
        for folder in claimed:
            remove_unfinished_run_folder(folder)
        raise
    return TakeBackRunFolders(claimed)


def add_extra_loggers(trainer: Trainer, names: list[ExtraLogger]) -> None:
    if names and not trainer.loggers:
        raise UserError("--extra_loggers log beside the run's CSV log, and trainer.logger is off; turn it on")
    if names:
        run = Path(trainer.loggers[0].log_dir)  # the first logger's own folder; no collective call yet
        trainer.loggers = [*trainer.loggers, *extra_loggers(names, run)]


def train_without_validation(trainer: Trainer) -> None:
    """data.val_size 0: no validation loop, and no best-by-validation checkpoints; `last.ckpt` is the model."""
    trainer.limit_val_batches = 0
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor and callback.monitor.startswith("val_"):
            callback.save_top_k = 0


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
        # Not Timer.time_elapsed(): it adds the time saved in the last checkpoint loaded (--test_after_fit's).
        seconds = (timer.end_time() or time.monotonic()) - timer.start_time()
        validated = trainer.limit_val_batches != 0
        lines.append(f"training time:    {seconds:.1f} s, {'validation included' if validated else 'no validation'}")
    for stage, label in (("val", "validation"), ("test", "test")):
        if f"{stage}_acc" in scores:
            ece = f", ECE {float(scores[f'{stage}_ece']):.4f}" if f"{stage}_ece" in scores else ""
            lines.append(
                f"{label + ':':<17} accuracy {float(scores[f'{stage}_acc']):.4f}, "
                f"loss {float(scores[f'{stage}_loss']):.4f}{ece}"
            )
    return "\n".join(lines)


def lightning_command(args: list[str] | None, description: str | None = None, run: bool = True) -> FashionMNISTCLI:
    """fit / validate / test / predict through LightningCLI (`run=False`: only build the trainer, model and data);
    `description` heads `fmnist --help`."""
    configure_runtime()
    # Parse errors raise instead of printing the whole usage, so that they too become one line.
    parser_kwargs: dict[str, Any] = {"description": description, "exit_on_error": False}
    parser_kwargs.update({name: {"exit_on_error": False} for name in LIGHTNING_SUBCOMMANDS})
    keep_last = KeepLastCheckpoint()
    try:
        return FashionMNISTCLI(
            FashionMNISTClassifier,
            FashionMNISTDataModule,
            args=args,
            run=run,
            save_config_callback=RecipeConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            auto_configure_optimizers=False,  # the optimizer is the model's own `model.optimizer` setting
            # Always there, whatever the config: no diverged state saved, exact resumes, the training time,
            # threads that yield to other processes' work.
            trainer_defaults={
                "callbacks": [DivergenceGuard(), RandomState(), keep_last, Timer(), ThreadsForFreeCores()]
            },
        )
    except SystemExit as stop:  # Lightning's orderly stop after SIGTERM, or its exit after a second Ctrl-C
        # A stopped run must not pass for a finished one (`fit ... && test ...`, a scheduler): the shells' status.
        if keep_last.interrupted:
            raise SystemExit(STOPPED_EXIT_STATUS[KeyboardInterrupt]) from None
        if isinstance(stop, SIGTERMException):
            raise SystemExit(STOPPED_EXIT_STATUS[Terminated]) from None
        raise


def end_distributed_run() -> None:
    """Shut DDP's process group down before exit: left to exit-time destructors, gloo can abort a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
