"""Errors a user can fix, and the one place that turns them into the CLI's one-line messages."""

import signal
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only

MAX_MESSAGE = 300
# Packages a config may need that are optional extras (a Lightning logger, the demo): module -> extra.
OPTIONAL_PACKAGES = {
    "tensorboard": "tensorboard",
    "tensorboardX": "tensorboard",
    "mlflow": "mlflow",
    "gradio": "demo",
    "captum": "explain",
}


class UserError(Exception):
    """Something wrong with the input (a file, a path, a setting), with what to do about it in the message."""


class DataError(UserError):
    """The Fashion-MNIST files are missing, unreachable or damaged."""


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that every `finally` and temporary file is cleaned up on the way
    out (as Ctrl-C's KeyboardInterrupt is); not an Exception, so that no `except Exception` swallows it."""


# 128 + the signal's number: what shells and schedulers report for a command stopped by that signal
STOPPED_EXIT_STATUS = {KeyboardInterrupt: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM}


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` instead of ending the process on the spot."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@rank_zero_only
def warn(message: str) -> None:
    """A warning the user can act on, as one `fmnist: warning:` line on stderr, from the first process only
    (Lightning's `rank_zero_warn` would add a file and line number the user has no use for)."""
    print(f"fmnist: warning: {message}", file=sys.stderr, flush=True)


def one_line_message(error: BaseException) -> str | None:
    """The one line to print for an error a user caused and can fix (a setting, a path, a file); None for a bug."""
    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, ArgumentError):
        message = str(error)
        if message.startswith("Unexpected config:"):
            message = "the --config file is not a YAML mapping of options"
        message = f"{shortened(message)} (see `fmnist SUBCOMMAND --help` for the options)"
    elif isinstance(error, MisconfigurationException):
        message = f"{shortened(str(error))} (a trainer setting; see `fmnist fit --help`)"
    elif isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    elif isinstance(error, ModuleNotFoundError) and error.name and error.name.split(".")[0] in OPTIONAL_PACKAGES:
        extra = OPTIONAL_PACKAGES[error.name.split(".")[0]]
        message = f"{error}; it comes with an optional part of this project: pip install -e '.[{extra}]'"
    elif isinstance(error, UnicodeDecodeError):
        byte = error.object[error.start : error.start + 1].hex()
        message = (
            f"a file read as text is not UTF-8 (byte 0x{byte} at position {error.start}: {error.reason}); "
            "save the --config file (or other text input) as UTF-8"
        )
    else:
        return None
    return " ".join(message.split())


def shortened(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."
