"""Lightning's TensorBoard and MLflow loggers beside the run's CSV log, writing into the same run folder, so
that the pictures, reports, `fmnist plot` and `--ckpt_path last/best` keep working whatever else logs."""

import importlib.util
import os
from pathlib import Path
from typing import Literal

from lightning.pytorch.loggers import Logger

from fmnist_lightning.errors import UserError

ExtraLogger = Literal["tensorboard", "mlflow"]
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> the module it needs


def extra_loggers(names: list[ExtraLogger], run_folder: Path) -> list[Logger]:
    """The loggers named, logging into `run_folder`: TensorBoard events in `tensorboard/`, MLflow's file store
    in `mlruns/` (experiment: the run's name, e.g. base; run: its version folder)."""
    for name in dict.fromkeys(names):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"--extra_loggers {name} needs the {name} package: pip install -e '.[{name}]'")
    loggers: list[Logger] = []
    if "tensorboard" in names:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run_folder, name="", version="tensorboard", default_hp_metric=False))
    if "mlflow" in names:
        from lightning.pytorch.loggers import MLFlowLogger

        # MLflow 3 keeps the plain-file store in maintenance mode behind this switch; files in the run folder
        # need no database or server, which is what a local run wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        store = (run_folder / "mlruns").absolute()
        loggers.append(
            MLFlowLogger(experiment_name=run_folder.parent.name, run_name=run_folder.name, tracking_uri=store.as_uri())
        )
    return loggers
