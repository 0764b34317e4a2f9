"""Checkpoint files: written atomically, read with `weights_only` (unpickling could run code), checked to be
this project's and finite; a save with non-finite weights is refused (the run has diverged)."""

import copy
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from fmnist_lightning.errors import UserError, shortened
from fmnist_lightning.outputs import atomic_write
from fmnist_lightning.training.settings import PATH_MODEL_SETTINGS

# The checkpoints this process has read and checked, by file identity: a command reads each file once, however
# many of its steps (run lookup, setting checks, LightningCLI, the weights, the Trainer) ask for it.
_READ: OrderedDict[tuple[int, ...], dict[str, Any]] = OrderedDict()
KEPT_CHECKPOINTS = 4


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning checkpoint safely and check it; every failure is a UserError naming the file.

    A file already read (same device, inode, size and times) is not read again: the caller gets its own copy
    of what was read, free to change."""
    path = Path(path)
    identity = file_identity(path) if map_location in (None, "cpu") else None
    if identity is not None and identity in _READ:
        _READ.move_to_end(identity)
        return copy.deepcopy(_READ[identity])
    checkpoint = _read_checkpoint(path, map_location)
    if identity is None:
        return checkpoint
    _READ[identity] = checkpoint
    while len(_READ) > KEPT_CHECKPOINTS:
        _READ.popitem(last=False)
    return copy.deepcopy(checkpoint)


def file_identity(path: Path) -> tuple[int, ...] | None:
    """What tells one version of a file from another: device, inode, size, modification and change times."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _read_checkpoint(path: Path, map_location: Any) -> dict[str, Any]:
    if path.is_dir():
        inside = next((p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()), None)
        raise UserError(f"{path} is a folder; give the path of a .ckpt file{f', e.g. {inside}' if inside else ''}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give the path of a .ckpt file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise UserError(
            f"{path} is not a readable checkpoint (not a PyTorch zip archive: truncated, damaged, or another kind "
            "of file); use another one, e.g. the run's last.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # weights_only names the global it refused; anything else is damage
            raise UserError(f"{path} is not a readable checkpoint (damaged: {first_line(error)})") from error
        raise UserError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data, "
            f"which could run code when loaded ({first_line(error)}); only use checkpoints written by this project"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(
            f"{path} is not a readable checkpoint (truncated or damaged: {first_line(error)}); "
            "use another one, e.g. the run's last.ckpt"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} is not a Lightning checkpoint (no 'state_dict'); give a .ckpt file saved by fit")
    check_named_classes(checkpoint.get("hyper_parameters"), path)
    if broken := first_non_finite(checkpoint["state_dict"]):
        raise UserError(
            f"{path} holds weights that are not finite (NaN or inf in {broken}): the run that saved it "
            "diverged; use an earlier checkpoint of that run"
        )
    return checkpoint


# All the code this project's checkpoints name: Lightning's instantiator, the model, torch.optim classes.
ALLOWED_NAME = re.compile(
    r"lightning\.pytorch\.cli\.instantiate_module|fmnist_lightning\.module\.FashionMNISTClassifier"
    r"|torch\.optim(\.[a-z_]+)*\.[A-Z]\w*"
)
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Keys whose value LightningCLI and Lightning import, wherever they stand.
IMPORTED_KEYS = frozenset({"class_path", "_class_path", "_instantiator"})


def check_named_classes(settings: Any, path: str | os.PathLike) -> None:
    """Refuse settings naming code outside `ALLOWED_NAME`: LightningCLI would import every class path in a
    checkpoint's `hyper_parameters`, which `weights_only` does not stop. A setting that is a file path
    (`teacher.ckpt`; the settings table says which) is never imported, so its value is data, whatever dots it has."""
    for name in _imported_names(settings, text_settings=PATH_MODEL_SETTINGS):
        if not ALLOWED_NAME.fullmatch(name):
            raise UserError(
                f"refusing to load {path}: its settings name {name}, and loading them would import that code; "
                "a checkpoint of this project only names torch.optim classes and its own model"
            )


def _imported_names(value: Any, text_settings: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every string in nested settings that could be read as an import path: the value of an imported key, and
    any dotted string, except directly under a top-level setting in `text_settings`."""
    if isinstance(value, str):
        if DOTTED_NAME.fullmatch(value.strip()):
            yield value.strip()
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in IMPORTED_KEYS and isinstance(item, str):
                yield item.strip()
            elif key in text_settings and isinstance(item, str):
                continue  # a path, never imported
            else:
                yield from _imported_names(key)
                yield from _imported_names(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _imported_names(item)


def load_weights(model: nn.Module, checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Load the checkpoint's weights strictly; weights of another model (names or shapes) are a UserError."""
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # torch names the missing, unexpected and reshaped weights, a line each
        details = "; ".join(line.strip().rstrip(".") for line in str(error).splitlines()[1:])
        raise UserError(
            f"{path} belongs to another model ({shortened(details)}); use a checkpoint of this model, or the "
            "config it was trained with"
        ) from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O through a temporary file (a kill or a full disk leaves the previous file
    intact), refusing non-finite weights, and loading with `weights_only` whatever Lightning passes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        kept = what_is_kept(path)
        if broken := first_non_finite(checkpoint["state_dict"]):
            raise UserError(
                f"training diverged at epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}: "
                f"{broken} is no longer finite (NaN/inf; is the learning rate too high?); stopped, {kept}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as file:
                torch.save(checkpoint, file)
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as RuntimeError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
            raise UserError(f"cannot save checkpoint {path}: {reason} (disk full?); stopped, {kept}") from error

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location=map_location or "cpu")


def what_is_kept(path: Path) -> str:
    """What a failed save leaves for the user to resume from, for its error message."""
    if path.exists():
        return f"{path} still holds the last good state"
    earlier = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
    if earlier:
        return f"the checkpoints saved before ({', '.join(earlier)}) are unchanged"
    return "no checkpoint was saved"


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, if any."""
    return next((name for name, tensor in state_dict.items() if not _finite(tensor)), None)


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
