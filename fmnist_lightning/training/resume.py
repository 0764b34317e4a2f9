"""Exact resumes: what a checkpoint records of its run, which settings a resume must match (all that change a
number), and the callbacks that keep a run resumable (random state, a current last.ckpt, SIGTERM, Ctrl-C)."""

import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lightning.outputs import atomic_write
from fmnist_lightning.training.run_folders import logger_settings, run_folder
from fmnist_lightning.training.settings import (
    FREE_SETTINGS,
    MODEL_DEFINING_SETTINGS,
    SPEED_MODEL_SETTINGS,
    TRAINER_RUN_SETTINGS,
)


class RunSettings(L.Callback):
    """Records the run's seed and trainer settings in every checkpoint (Lightning saves callback state)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def run_settings(config: Any) -> dict[str, Any]:
    """The seed and trainer settings of a parsed subcommand config, as `RunSettings` records them."""
    settings = {"seed_everything": config.get("seed_everything")}
    return settings | {f"trainer.{name}": config.trainer.get(name) for name in TRAINER_RUN_SETTINGS}


def recipe_differences(config: Any, checkpoint: Mapping[str, Any], only: Iterable[str] | None = None) -> list[str]:
    """'data.batch_size is 32 here, 64 in its run' for each setting of `config` the checkpoint's run had otherwise."""
    current = _flatten({"model": _as_dict(config.model), "data": _as_dict(config.data)}) | run_settings(config)
    recorded = checkpoint.get("callbacks", {}).get(RunSettings.__qualname__, {})
    saved = _flatten({"model": checkpoint.get("hyper_parameters") or {}}) | recorded
    saved |= _flatten({"data": checkpoint.get("datamodule_hyper_parameters") or {}})
    keys = set(only) if only is not None else saved.keys() - FREE_SETTINGS
    if current.get("model.lr_schedule", "constant") == "constant":
        keys.discard("trainer.max_epochs")  # extending a run is fine when no schedule spans it
    return [
        f"{key} is {current[key]!r} here, {saved[key]!r} in its run"
        for key in sorted(keys & current.keys() & saved.keys())
        if _comparable(current[key]) != _comparable(saved[key])
    ]


def _as_dict(namespace: Any) -> Any:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else namespace


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if str(key).startswith("_"):  # Lightning's bookkeeping (_instantiator, _class_path)
            continue
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _comparable(value: Any) -> Any:
    return tuple(_comparable(item) for item in value) if isinstance(value, list | tuple) else value


class RandomState(L.Callback):
    """Saves the global random generators (dropout, augmentation) in checkpoints and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state_dict["cuda"]))


SIGNAL_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"


class KeepLastCheckpoint(L.Callback):
    """Keeps `last.ckpt` current: after every validation, and on SIGTERM or a first Ctrl-C (an orderly stop
    at the batch's end, exit 130). Lightning 2.6's `save_last` only follows new best epochs, and its
    `save_on_exception` saves on any error, a diverged run's included.

    A resumed run whose folder was copied or moved keeps writing its own last.ckpt (not `last-v1.ckpt`);
    a checkpoint that is only scored does not restore the ModelCheckpoint's paths at all.
    """

    def __init__(self) -> None:
        self.interrupted = False  # by Ctrl-C
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_at_batch_end)
            # Lightning logs the SIGTERM this class sends itself; the user pressed Ctrl-C.
            logging.getLogger(SIGNAL_LOGGER).addFilter(self._quiet_own_sigterm)

    def _quiet_own_sigterm(self, record: logging.LogRecord) -> bool:
        return not (self.interrupted and "Received SIGTERM" in record.getMessage())

    def _stop_at_batch_end(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the batch to end
        self.interrupted = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's orderly stop at the end of the batch

    def _restore_sigint(self) -> None:
        logging.getLogger(SIGNAL_LOGGER).removeFilter(self._quiet_own_sigterm)
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resumed_from = Path(trainer.ckpt_path or "").resolve().parent
        for callback in trainer.checkpoint_callbacks:
            if trainer.state.fn != TrainerFn.FITTING:  # only scored: its saved paths belong to the run that wrote it
                checkpoint.get("callbacks", {}).pop(callback.state_key, None)
                continue
            state = checkpoint.get("callbacks", {}).get(callback.state_key)
            if not state or not callback.dirpath or Path(callback.dirpath).resolve() != resumed_from:
                continue
            old, new = state.get("dirpath"), callback.dirpath
            if not old or old == new:
                continue
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state[key] = _moved(state.get(key), old, new)
            state["best_k_models"] = {
                _moved(path, old, new): score for path, score in state.get("best_k_models", {}).items()
            }
            state["dirpath"] = new

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        # Its own file name, so that the ModelCheckpoint does not take the file for another's and write last-v1.
        if fitting and checkpoint is not None and checkpoint.save_last and checkpoint.last_model_path:
            trainer.save_checkpoint(checkpoint.last_model_path, weights_only=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        checkpoint = trainer.checkpoint_callback
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not isinstance(exception, SIGTERMException) or not fitting or checkpoint is None:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        cause = "interrupted (Ctrl-C)" if self.interrupted else "received SIGTERM"
        if trainer.training:
            trainer.save_checkpoint(path, weights_only=False)
            what = f"saved {path}"
        else:  # during validation: last.ckpt holds the end of the epoch's training or an earlier state
            what = f"{path} holds the last saved state"
        config = run_folder(trainer) / "config.yaml"  # every process: a collective call under DDP
        if trainer.is_global_zero:
            how = f"fmnist fit --config {config} --ckpt_path {path}"
            print(f"{cause}: {what}; resume with `{how}`", flush=True)


def _moved(path: str | None, old: str, new: str) -> str | None:
    """A path saved in the `old` checkpoint folder, in the `new` one; any other path as it is."""
    return str(Path(new) / Path(path).name) if path and Path(path).parent == Path(old) else path


def keep_command_line_settings(given: Any, from_checkpoint: Any, defaults: Mapping[str, Any]) -> list[str]:
    """Put the command line's speed-only model settings back over the checkpoint's (in `from_checkpoint`);
    return a warning for each model-defining setting the user gave that the checkpoint overrides."""
    for key in SPEED_MODEL_SETTINGS:
        if _get(given, key) is not None:
            from_checkpoint[key] = given[key]
    return [
        f"--model.{key} {_get(given, key)!r} is ignored: the checkpoint's model has {_get(from_checkpoint, key)!r}"
        for key in MODEL_DEFINING_SETTINGS
        if _comparable(_get(given, key))
        not in (_comparable(_get(from_checkpoint, key)), _comparable(defaults.get(key)))
    ]


def _get(namespace: Any, key: str) -> Any:
    try:
        return namespace[key]
    except (KeyError, TypeError):
        return None


class RecipeConfig(SaveConfigCallback):
    """`config.yaml` that reruns the recipe from scratch; a resume's checkpoint and run-folder version go to
    `resumed.yaml` beside it instead of being pinned in the recipe."""

    def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        config = config.clone()
        settings = logger_settings(config.trainer.get("logger"))
        self.resumed = {"ckpt_path": config.get("ckpt_path"), "version": settings.get("version") if settings else None}
        if "ckpt_path" in config:
            config.ckpt_path = None
        if settings is not None:
            settings.version = None
        super().__init__(parser, config, *args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.resumed["ckpt_path"] and trainer.log_dir:
            with atomic_write(Path(trainer.log_dir) / "resumed.yaml", "w", encoding="utf-8") as file:
                yaml.safe_dump(self.resumed, file)
