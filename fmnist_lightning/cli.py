"""`fmnist` / `python -m fmnist_lightning`: Lightning's CLI over the model and the data module."""

import argparse
import inspect
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.calibration import calibrate_checkpoint
from fmnist_lightning.callbacks import PredictionWriter
from fmnist_lightning.checkpoints import DivergenceGuard, load_checkpoint, load_weights
from fmnist_lightning.curves import FORMATS, draw_curves
from fmnist_lightning.data import DEFAULT_DATA_DIR, FashionMNISTDataModule
from fmnist_lightning.errors import STOPPED_EXIT_STATUS, Terminated, UserError, one_line_message, sigterm_raises
from fmnist_lightning.export import FORMATS as EXPORT_FORMATS
from fmnist_lightning.export import export_checkpoint
from fmnist_lightning.loggers import ExtraLogger, extra_loggers
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.resume import (
    SPLIT_SETTINGS,
    KeepLastCheckpoint,
    RandomState,
    RecipeConfig,
    RunSettings,
    keep_command_line_settings,
    recipe_differences,
    run_settings,
)
from fmnist_lightning.run_folders import (
    NewRunFolder,
    TakeBackRunFolders,
    claim_run_folder,
    continue_run_folder,
    find_run_checkpoint,
    remove_unfinished_run_folder,
    run_folder,
    runs_root,
)
from fmnist_lightning.speed import configure_runtime, fastest_precision
from fmnist_lightning.threads import ThreadsForFreeCores, fixed_thread_count

DEBUG_ENV = "FMNIST_DEBUG"
CLI_DESCRIPTION = (
    "Train, evaluate and inspect the original Keras Fashion-MNIST CNN with Lightning. Besides the "
    "subcommands below: `fmnist plot RUN` draws a run's curves, `fmnist export --ckpt_path CKPT` writes "
    "ONNX or TorchScript, `fmnist calibrate --ckpt_path CKPT` fits a temperature to the probabilities, "
    "`fmnist lr_find --config CONFIG` runs Lightning's learning-rate finder, `fmnist demo --ckpt_path last` "
    "serves a local web app."
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
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # --predictions.output/format/top_k
        parser.add_argument(
            "--extra_loggers",
            type=list[ExtraLogger],
            default=[],
            help="Lightning loggers beside the CSV log, in the same run folder: tensorboard, mlflow",
        )
        # Checkpoints are saved atomically and loaded without running pickled code, whatever the config.
        parser.set_defaults({"trainer.plugins": [{"class_path": "fmnist_lightning.checkpoints.SafeCheckpointIO"}]})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Also fill in an unset precision, resolve `--ckpt_path last|best`, and check the checkpoint and settings
        before LightningCLI reads the model's settings from it (which imports the classes they name)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # none: `lr_find`, which runs no subcommand
        if config.trainer.precision is None:  # unset: the fastest for this machine
            config.trainer.precision = fastest_precision(config.trainer.accelerator)
        if not subcommand:
            return
        max_epochs = config.trainer.max_epochs
        if subcommand == "fit" and max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
            raise UserError(f"trainer.max_epochs must be at least 1 (or -1 for no limit), got {max_epochs}")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            ckpt_path = config["ckpt_path"] = str(find_run_checkpoint(runs_root(config.trainer.logger), ckpt_path))
        if not ckpt_path and subcommand != "fit":  # a freshly initialised model's scores mean nothing
            raise UserError(
                f"{subcommand} needs a trained model: give --ckpt_path with a .ckpt file, "
                "or `last`/`best` for the newest run's"
            )
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS:
            return
        self.given_model_settings = config.model.clone()  # before LightningCLI puts the checkpoint's over them
        checkpoint = load_checkpoint(ckpt_path)
        settings = set(checkpoint.get("hyper_parameters") or {}) - {"_instantiator"}
        unknown = settings - set(inspect.signature(FashionMNISTClassifier).parameters)
        if unknown:
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

    def before_instantiate_classes(self) -> None:
        given = getattr(self, "given_model_settings", None)
        if given is None or not self.subcommand:
            return
        defaults = {name: p.default for name, p in inspect.signature(FashionMNISTClassifier).parameters.items()}
        for warning in keep_command_line_settings(given, self.config[self.subcommand].model, defaults):
            print(f"fmnist: warning: {warning}", file=sys.stderr)

    def after_instantiate_classes(self) -> None:
        ckpt_path = self._get(self.config, "ckpt_path") if self.subcommand else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS:
            checkpoint = load_checkpoint(ckpt_path)
            load_weights(self.model, checkpoint, ckpt_path)
            if self.model.test_time_augmentation and not trained_with_flips(checkpoint):
                print(
                    f"fmnist: warning: {ckpt_path} was trained without data.flip, so its mirror images are new "
                    "to it and --model.tta usually lowers accuracy (docs/improvements.md)",
                    file=sys.stderr,
                )
        if self.subcommand == "fit" and not self.datamodule.validating:
            train_without_validation(self.trainer)
        if self.subcommand:  # recorded by fit; there in every subcommand, as Lightning expects its state's owner
            self.trainer.callbacks.append(RunSettings(run_settings(self.config[self.subcommand])))
        # Last, once nothing else can refuse the command: the run folders it writes to.
        claimed: list[NewRunFolder | None] = []
        try:
            for logger in self.trainer.loggers:
                claimed.append(claim_run_folder(logger))
        except BaseException:
            for folder in claimed:
                remove_unfinished_run_folder(folder)
            raise
        self.trainer.callbacks.append(TakeBackRunFolders(claimed))
        extra = self._get(self.config, "extra_loggers")
        if extra and not self.trainer.loggers:
            raise UserError("--extra_loggers log beside the run's CSV log, and trainer.logger is off; turn it on")
        if extra:
            run = Path(self.trainer.loggers[0].log_dir)  # the first logger's own folder; no collective call yet
            self.trainer.loggers = [*self.trainer.loggers, *extra_loggers(extra, run)]

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


def train_without_validation(trainer: Trainer) -> None:
    """data.val_size 0: no validation loop, and no best-by-validation checkpoints; `last.ckpt` is the model."""
    trainer.limit_val_batches = 0
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor and callback.monitor.startswith("val_"):
            callback.save_top_k = 0


def trained_with_flips(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the run that saved `checkpoint` mirrored its training images (`data.flip`)."""
    return bool((checkpoint.get("datamodule_hyper_parameters") or {}).get("flip"))


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


def quiet_lightning_noise() -> None:
    """Drop Lightning's advertising tips and a torch deprecation warning that users cannot act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Image files stream without batch indices; the prediction writer takes paths from the batch.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")


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


def demo_command(args: list[str]) -> None:
    """`fmnist demo --ckpt_path CKPT`: a local web app to try the model, explore its mistakes, compare runs."""
    from fmnist_lightning import demo

    parser = ArgumentParser(prog="fmnist demo", description=demo_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint (.ckpt), or last/best of the newest run")
    parser.add_argument("--port", type=int, default=demo.DEFAULT_PORT, help="port to serve on")
    parser.add_argument(
        "--host",
        default=demo.DEFAULT_HOST,
        help="address to serve on; 0.0.0.0 lets other machines in, with no login: only on a network you trust",
    )
    parser.add_argument("--runs_dir", default="runs", help="folder of runs for the Runs tab and last/best")
    parser.add_argument("--data_dir", help="Fashion-MNIST folder (default: the checkpoint's run's data.data_dir)")
    parser.add_argument("--top_k", type=int, default=3, help="classes shown per prediction")
    config = parser.parse_args(args)
    if not 0 < config.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {config.port}")
    if not 1 <= config.top_k <= len(CLASS_NAMES):
        raise UserError(f"--top_k must be between 1 and {len(CLASS_NAMES)}, got {config.top_k}")
    demo.host_family(config.host)  # refuses a host that is no address, before the model is loaded
    with demo.offline_gradio():  # before Gradio is imported: it reads these settings then
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the demo needs Gradio: pip install -e '.[demo]' (scripts/setup.sh installs it)") from None
        runs_dir = Path(config.runs_dir)
        loaded = demo.load_for_demo(demo.resolve_checkpoint(config.ckpt_path, runs_dir))
        demo.ensure_port_free(config.host, config.port)
        try:
            test_set: demo.ScoredTestSet | str = demo.predict_test_set(loaded, config.data_dir)
        except UserError as error:  # the other tabs still work
            test_set = str(error)
        demo.serve(demo.build_app(loaded, test_set, runs_dir, config.top_k), config.host, config.port)


def lr_find_command(args: list[str]) -> None:
    """`fmnist lr_find --config CONFIG [--min_lr --max_lr --num_training]`: Lightning's learning-rate finder for
    the configured model, data and optimizer; the plot goes to a run folder, the suggestion is printed."""
    options = argparse.ArgumentParser(
        prog="fmnist lr_find", description=lr_find_command.__doc__, add_help=False, exit_on_error=False
    )
    options.add_argument("--min_lr", type=float, default=1e-6)
    options.add_argument("--max_lr", type=float, default=1.0)
    options.add_argument("--num_training", type=int, default=100, help="training steps the search takes")
    finder_settings, rest = options.parse_known_args(args)
    check_finder_range(finder_settings.min_lr, finder_settings.max_lr, finder_settings.num_training)
    cli = lightning_command(rest, run=False)
    take_back = next(callback for callback in cli.trainer.callbacks if isinstance(callback, TakeBackRunFolders))
    try:
        finder = Tuner(cli.trainer).lr_find(
            cli.model, datamodule=cli.datamodule, update_attr=False, **vars(finder_settings)
        )  # the optimizer's learning rate is swept by Lightning's own schedule; the model keeps its setting
        suggestion = finder.suggestion() if finder is not None else None
        if suggestion is None:
            raise UserError(
                "the learning-rate finder found no clear minimum (the loss blew up early, or too few steps "
                "were left); try a lower --max_lr or more --num_training steps"
            )
        import matplotlib.pyplot as plt  # only now: the other commands never pay for matplotlib's import

        from fmnist_lightning.plots import save_figure

        folder = run_folder(cli.trainer)
        figure = finder.plot(suggest=True)  # Lightning draws it with pyplot
        save_figure(figure, folder / "lr_find.png")
        plt.close(figure)
    except BaseException:  # nothing left behind: the run folder and its config.yaml go too
        take_back.take_back()
        raise
    print(f"lr_find plot:     {folder / 'lr_find.png'}")
    print(f"suggested lr:     {suggestion:.3g} (set it as model.optimizer.init_args.lr)")


# Lightning's suggestion leaves out the first 10 losses and the last one, and needs two to take a slope.
FINDER_MIN_STEPS = 13


def check_finder_range(min_lr: float, max_lr: float, num_training: int) -> None:
    """Refuse a search range the finder cannot sweep before anything runs."""
    if not 0 < min_lr < max_lr or not math.isfinite(max_lr):
        raise UserError(
            f"lr_find sweeps from --min_lr up to --max_lr, both positive: got {min_lr:g} and {max_lr:g}; "
            "give for example --min_lr 1e-6 --max_lr 1"
        )
    if num_training < FINDER_MIN_STEPS:
        raise UserError(
            f"--num_training {num_training} is too few steps for a suggestion; give at least {FINDER_MIN_STEPS} "
            "(the default is 100)"
        )


TOOL_COMMANDS = {
    "plot": plot_command,
    "export": export_command,
    "calibrate": calibrate_command,
    "demo": demo_command,
    "lr_find": lr_find_command,
}


def lightning_command(args: list[str] | None, run: bool = True) -> FashionMNISTCLI:
    """fit / validate / test / predict through LightningCLI (`run=False`: only build the trainer, model and data)."""
    configure_runtime()
    # Parse errors raise instead of printing the whole usage, so that they too become one line.
    parser_kwargs = {"description": CLI_DESCRIPTION, "exit_on_error": False}
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


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a user's error is one line on stderr and exit status 2 (FMNIST_DEBUG=1: the traceback).
    A tool command stopped by Ctrl-C or SIGTERM cleans up, says so in one line and exits 130 or 143."""
    quiet_lightning_noise()
    argv = sys.argv[1:] if args is None else args
    try:
        fixed_thread_count()  # a bad OMP_NUM_THREADS is refused before anything runs
        if argv and argv[0] in TOOL_COMMANDS:
            with sigterm_raises():
                TOOL_COMMANDS[argv[0]](argv[1:])
        else:
            lightning_command(args)
            end_distributed_run()
    except (KeyboardInterrupt, Terminated) as stop:
        cause = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
        print(f"fmnist: stopped by {cause}; no file was left half-written", file=sys.stderr)
        sys.exit(STOPPED_EXIT_STATUS[type(stop)])
    except Exception as error:
        message = one_line_message(error)
        if message is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"fmnist: error: {message}", file=sys.stderr)
        sys.exit(2)


def end_distributed_run() -> None:
    """Shut DDP's process group down before exit: left to exit-time destructors, gloo can abort a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
