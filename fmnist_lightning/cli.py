"""`fmnist` / `python -m fmnist_lightning`: the front door. The command table (the help text is made from it),
dispatch to the command's module, and the one place where errors become one line and an exit status."""

import importlib
import logging
import os
import sys
import warnings
from typing import NamedTuple

from fmnist_lightning.commands.lightning import end_distributed_run, lightning_command
from fmnist_lightning.errors import STOPPED_EXIT_STATUS, Terminated, one_line_message, sigterm_raises
from fmnist_lightning.training.threads import fixed_thread_count

DEBUG_ENV = "FMNIST_DEBUG"


class ToolCommand(NamedTuple):
    """A subcommand beyond Lightning's four: how it is called, what it does, and its module's entry function."""

    usage: str
    summary: str
    entry: str  # "module:function" under fmnist_lightning.commands, imported only when the command runs


TOOL_COMMANDS = {
    "plot": ToolCommand("fmnist plot RUN", "draws a run's curves", "plot:plot_command"),
    "export": ToolCommand("fmnist export --ckpt_path CKPT", "writes ONNX or TorchScript", "export:export_command"),
    "calibrate": ToolCommand(
        "fmnist calibrate --ckpt_path CKPT", "fits a temperature to the probabilities", "calibrate:calibrate_command"
    ),
    "lr_find": ToolCommand(
        "fmnist lr_find --config CONFIG", "runs Lightning's learning-rate finder", "lr_find:lr_find_command"
    ),
    "explain": ToolCommand(
        "fmnist explain --ckpt_path CKPT", "shows what the model looks at (Captum)", "explain:explain_command"
    ),
    "demo": ToolCommand("fmnist demo --ckpt_path last", "serves a local web app", "demo:demo_command"),
    "serve": ToolCommand("fmnist serve --ckpt_path last", "answers predictions over HTTP", "serve:serve_command"),
}


def description() -> str:
    """`fmnist --help`'s text, with every tool command from the table."""
    tools = ", ".join(f"`{command.usage}` {command.summary}" for command in TOOL_COMMANDS.values())
    return (
        "Train, evaluate and inspect the original Keras Fashion-MNIST CNN with Lightning. Besides the "
        f"subcommands below: {tools}."
    )


def run_tool(name: str, args: list[str]) -> None:
    module, function = TOOL_COMMANDS[name].entry.split(":")
    getattr(importlib.import_module(f"fmnist_lightning.commands.{module}"), function)(args)


def quiet_lightning_noise() -> None:
    """Drop Lightning's advertising tips and a torch deprecation warning that users cannot act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip:")
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Image files stream without batch indices; the prediction writer takes paths from the batch.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a user's error is one line on stderr and exit status 2 (FMNIST_DEBUG=1: the traceback).
    A tool command stopped by Ctrl-C or SIGTERM cleans up, says so in one line and exits 130 or 143."""
    quiet_lightning_noise()
    argv = sys.argv[1:] if args is None else args
    try:
        fixed_thread_count()  # a bad OMP_NUM_THREADS is refused before anything runs
        if argv and argv[0] in TOOL_COMMANDS:
            with sigterm_raises():
                run_tool(argv[0], argv[1:])
        else:
            lightning_command(args, description())
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
