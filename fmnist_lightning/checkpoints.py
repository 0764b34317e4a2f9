"""Checkpoint files: written atomically, read with `weights_only` (unpickling could run code), checked to be
this project's and finite, and never written for a run that has diverged (`DivergenceGuard`)."""

import inspect
import math
import os
import pickle
import re
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import UserError, shortened
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_write


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning checkpoint safely and check it; every failure is a UserError naming the file."""
    path = Path(path)
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
            raise UserError(f"{path} is not a readable checkpoint (damaged: {_first_line(error)})") from error
        raise UserError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain data, "
            f"which could run code when loaded ({_first_line(error)}); only use checkpoints written by this project"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(
            f"{path} is not a readable checkpoint (truncated or damaged: {_first_line(error)}); "
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
    checkpoint's `hyper_parameters`, which `weights_only` does not stop. A setting typed as text (a file
    path such as `teacher.ckpt`) is never imported, so its value is data, whatever dots it has."""
    for name in _imported_names(settings, text_settings=_text_settings()):
        if not ALLOWED_NAME.fullmatch(name):
            raise UserError(
                f"refusing to load {path}: its settings name {name}, and loading them would import that code; "
                "a checkpoint of this project only names torch.optim classes and its own model"
            )


def _text_settings() -> frozenset[str]:
    """The model's settings whose type takes plain text (file paths): jsonargparse keeps such a string as it is."""
    parameters = inspect.signature(FashionMNISTClassifier).parameters.values()
    return frozenset(p.name for p in parameters if str in (typing.get_args(p.annotation) or (p.annotation,)))


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
            reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_from_checkpoint(path: str | os.PathLike) -> tuple[FashionMNISTClassifier, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with (its saved settings) and load its weights, in eval mode;
    also the checkpoint itself, read once, for callers that want more of it."""
    checkpoint = load_checkpoint(path)
    settings = {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key[0] != "_"}
    try:
        model = instantiate_module(FashionMNISTClassifier, settings)
    except Exception as error:  # jsonargparse reports unknown or ill-typed settings in many ways
        raise UserError(f"{path} was not saved by this project's model ({_first_line(error)})") from error
    load_weights(model, checkpoint, path)
    return model.eval(), checkpoint


class DivergenceGuard(L.Callback):
    """Stops a fit whose loss has blown up, after validation and before any checkpoint callback saves it.

    The epoch's mean training loss (summed on the device) and the validation loss must be finite and
    below `EXPLODED` times a uniform guess's, which no learning run comes near.
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
