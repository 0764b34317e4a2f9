"""A checkpoint loaded with what the demo's page and the server's /info say about it: its recipe in words, its
parameters and the test accuracy its run measured."""

from dataclasses import dataclass
from pathlib import Path

from fmnist_lightning.data.files import SYSTEM_DATA_DIR
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.metrics_log import METRICS_FILE, read_run
from fmnist_lightning.training.run_folders import find_run_checkpoint
from fmnist_lightning.training.settings import AUGMENTATION_SETTINGS, Kind, model_settings


@dataclass
class LoadedCheckpoint:
    """The model and what the pages say about it."""

    model: FashionMNISTClassifier
    path: Path
    recipe: str
    test_accuracy: float | None
    data_dir: str
    system_dir: str

    @property
    def parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.network.parameters())


# Named on their own in the recipe line: the network, the optimizer and the calibration.
OWN_PLACE_IN_RECIPE = frozenset({"architecture", "optimizer", "temperature"})


def resolve_checkpoint(ckpt_path: str, runs_dir: Path) -> Path:
    """`last`/`best`: that checkpoint of the newest run under `runs_dir` (any run name); else the path itself."""
    return find_run_checkpoint(runs_dir, ckpt_path) if ckpt_path in ("last", "best") else Path(ckpt_path)


def describe_checkpoint(path: Path) -> LoadedCheckpoint:
    """The model in eval mode (float32, CPU) with its recipe and, when its run tested it, its test accuracy."""
    model, checkpoint = FashionMNISTClassifier.from_checkpoint(path)
    settings = checkpoint.get("hyper_parameters") or {}
    defaults = FashionMNISTClassifier.default_settings()
    recipe_settings = set(model_settings(Kind.MODEL, Kind.RUN)) - OWN_PLACE_IN_RECIPE
    changed = [name for name in sorted(recipe_settings & settings.keys()) if settings[name] != defaults.get(name)]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if any(data.get(name) for name in AUGMENTATION_SETTINGS):
        changed.append("augmentation")
    optimizer = (settings.get("optimizer") or {}).get("class_path", "torch.optim.Adam").rsplit(".", 1)[-1]
    recipe = f"{settings.get('architecture', 'original')} network, {optimizer}"
    recipe += f", improved recipe ({', '.join(changed)})" if changed else ", the original recipe"
    if model.temperature != 1:
        recipe += f", calibrated (temperature {model.temperature:.3f})"
    return LoadedCheckpoint(
        model=model,
        path=path,
        recipe=recipe,
        test_accuracy=_tested_accuracy(path),
        data_dir=str(data.get("data_dir", "data")),
        system_dir=str(data.get("system_dir", SYSTEM_DATA_DIR)),
    )


def _tested_accuracy(checkpoint_path: Path) -> float | None:
    """The test accuracy in the checkpoint's run's metrics.csv, if that run was tested."""
    metrics_file = checkpoint_path.parent.parent / METRICS_FILE
    try:
        return read_run(metrics_file).final.get("test_acc") if metrics_file.is_file() else None
    except UserError:
        return None
