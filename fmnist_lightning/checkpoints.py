"""Checkpoint files: written atomically, read without running pickled code, checked to be this project's,
and never written for a run that has diverged (`DivergenceGuard`).

A checkpoint is a pickle, and unpickling can run arbitrary code. Everything here loads with PyTorch's
`weights_only=True`, which only rebuilds tensors and plain data (dicts, lists, numbers, strings) and
refuses anything else; the project's checkpoints contain nothing else, so torch needs no allow-list of
extra classes. The class names a checkpoint's settings hold are checked separately (`check_named_classes`).
"""

import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_write


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning checkpoint safely and check it; every failure is a UserError naming the file.

    Besides `weights_only` loading: the classes its settings name must be ones this project writes
    (`check_named_classes`, before anything imports them), and its weights must be finite.
    """
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


# The only code a checkpoint's settings may name: Lightning's instantiator, the model's class, and the
# optimizer and learning-rate schedule classes of torch.optim: all that this project writes there.
ALLOWED_NAME = re.compile(
    r"lightning\.pytorch\.cli\.instantiate_module|fmnist_lightning\.module\.FashionMNISTClassifier"
    r"|torch\.optim(\.[a-z_]+)*\.[A-Z]\w*"
)
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def check_named_classes(settings: Any, path: str | os.PathLike) -> None:
    """Refuse model settings that name a class or function outside the allowed ones, before any import.

    LightningCLI rebuilds the model from a checkpoint's `hyper_parameters`, importing every
    `class_path` (and dotted name given as a shorthand for one) it finds there; `weights_only` does not
    stop that.
    """
    for name in _dotted_names(settings):
        if not ALLOWED_NAME.fullmatch(name):
            raise UserError(
                f"refusing to load {path}: its settings name {name}, and loading them would import that code; "
                "a checkpoint of this project only names torch.optim classes and its own model"
            )


def _dotted_names(value: Any) -> Any:
    """Every string in nested settings that could be read as an import path."""
    if isinstance(value, str):
        if DOTTED_NAME.fullmatch(value.strip()):
            yield value.strip()
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _dotted_names(key)
            yield from _dotted_names(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _dotted_names(item)


def ensure_checkpoint_fits(checkpoint: dict[str, Any], model: nn.Module, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights belong to another model (names or shapes differ)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in checkpoint["state_dict"].items()}
    if expected == found:
        return
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(name for name in expected.keys() & found.keys() if expected[name] != found[name])
    details = "; ".join(
        f"{label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
        if names
    )
    raise UserError(
        f"{path} belongs to another model ({details}); use a checkpoint of this model, or the config it was "
        "trained with"
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing through a temporary file and loading with `weights_only`.

    A process killed while saving, or a full disk, leaves the previous checkpoint intact, never a
    truncated one under the final name; weights that are no longer finite (a diverged run) are never
    saved over a good checkpoint; loading never runs pickled code, whatever `weights_only` Lightning
    passes.
    """

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


def model_from_checkpoint(path: str | os.PathLike) -> tuple[FashionMNISTClassifier, Path]:
    """Rebuild the model a checkpoint was trained with (its saved settings) and load its weights, in eval mode."""
    checkpoint = load_checkpoint(path)
    settings = dict(checkpoint.get("hyper_parameters") or {})
    settings.pop("_instantiator", None)
    settings.pop("_class_path", None)
    try:
        model = instantiate_module(FashionMNISTClassifier, settings)
    except Exception as error:  # jsonargparse reports unknown or ill-typed settings in many ways
        raise UserError(f"{path} was not saved by this project's model ({_first_line(error)})") from error
    ensure_checkpoint_fits(checkpoint, model, path)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), Path(path)


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
