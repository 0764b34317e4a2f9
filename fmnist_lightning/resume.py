"""What a checkpoint's run must share with the command that continues or scores it.

A resumed run must compute what the interrupted one would have: same model, data order, batches,
precision and seed. Settings that only change speed or where files are may differ; `max_epochs` may
grow where the learning rate does not follow a schedule planned over the whole run.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L

# Settings that change no number of a run: how fast it goes, and where its files are.
FREE_SETTINGS = frozenset(
    {
        "model.compile",
        "model.channels_last",
        "model.cuda_graph",
        "model.pool_before_relu",
        "model.optimizer.init_args.fused",
        "model.optimizer.init_args.foreach",
        "data.data_dir",
        "data.system_dir",
        "data.download",
        "data.eval_batch_size",
        "data.num_workers",
        "data.predict_paths",
        "data.invert",
        "data.data_on_device",  # batches are augmented on the accelerator either way
    }
)
# Trainer settings that decide what a run computes; recorded in its checkpoints by `RunSettings`.
TRAINER_SETTINGS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
    "devices",
    "num_nodes",
    "max_epochs",
)
SPLIT_SETTINGS = ("data.split_seed", "data.val_size")


class RunSettings(L.Callback):
    """Records the run's seed and trainer settings in every checkpoint (Lightning saves callback state)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def run_settings(config: Any) -> dict[str, Any]:
    """The seed and trainer settings of a parsed subcommand config, as `RunSettings` records them."""
    settings = {"seed_everything": config.get("seed_everything")}
    return settings | {f"trainer.{name}": config.trainer.get(name) for name in TRAINER_SETTINGS}


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
