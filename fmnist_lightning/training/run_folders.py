"""Run folders (`save_dir/name/version_N`): the one a run writes to, the newest run's checkpoints, the folder
a resumed run continues, and a new one claimed atomically and taken back if the command fails for nothing."""

import shutil
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fmnist_lightning.errors import UserError
from fmnist_lightning.outputs import ensure_output_path, nearest_existing, remove_empty_folders
from fmnist_lightning.training.checkpoints import load_checkpoint


def run_folder(trainer: L.Trainer) -> Path:
    """The logger's version folder, where reports go too; under DDP a collective call (rank 0 broadcasts)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def checkpoint_run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (RUN for RUN/checkpoints/x.ckpt), else the folder it is in:
    where the tool commands put what they make from it."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def find_run_checkpoint(runs: Path, which: str) -> Path:
    """`last` or `best` checkpoint of the newest run under `runs`: a logger's save_dir/name (its version_N
    folders), or a folder of those (the demo's --runs_dir). The newest run is the one that saved a checkpoint
    last; its last.ckpt names its best one. Every command resolves `last`/`best` here."""
    lasts = [*runs.glob("version_*/checkpoints/last.ckpt"), *runs.glob("*/version_*/checkpoints/last.ckpt")]
    if not lasts:
        raise UserError(
            f"--ckpt_path {which}: no run with a checkpoints/last.ckpt under {runs}; "
            "train first, or give the path of a .ckpt file"
        )
    last = max(lasts, key=lambda path: path.stat().st_mtime_ns)
    if which == "last":
        return last
    for state in load_checkpoint(last).get("callbacks", {}).values():
        best = state.get("best_model_path") if isinstance(state, dict) else None
        if best and (last.parent / Path(best).name).is_file():
            return last.parent / Path(best).name
    raise UserError(f"--ckpt_path best: {last} does not say which checkpoint is best; give the path of a .ckpt file")


class NewRunFolder(NamedTuple):
    """A run folder this command created, and the folder that already existed above it."""

    path: Path
    existed: Path


def claim_run_folder(logger: Any) -> NewRunFolder | None:
    """Create the logger's next `version_N` folder now with an atomic mkdir and make the logger use it:
    Lightning picks the number early and creates the folder late, so two runs started together could share it."""
    root = getattr(logger, "root_dir", None)
    if root is None or getattr(logger, "_version", 0) is not None or rank_zero_only.rank != 0:
        return None  # no folder of its own, a version already chosen (a resumed run), or not the first process
    ensure_output_path(root, "--trainer.logger.init_args.save_dir", is_folder=True)
    existed = nearest_existing(Path(root))
    Path(root).mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        try:
            (Path(root) / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    logger._version = version  # CSVLogger and TensorBoardLogger keep the chosen version here
    return NewRunFolder(Path(root) / f"version_{version}", existed)


def remove_unfinished_run_folder(folder: NewRunFolder | None) -> None:
    """Remove a failed command's new run folder if it holds no checkpoint or metrics, and the empty folders above."""
    if folder is None or not folder.path.is_dir():
        return
    if any(folder.path.rglob("*.ckpt")) or (folder.path / "metrics.csv").is_file():
        return  # the run trained: what it left is worth keeping
    shutil.rmtree(folder.path, ignore_errors=True)
    remove_empty_folders(folder.path.parent, folder.existed)


def logger_settings(logger: Any) -> Any:
    """The init_args of the (first) configured logger, or None for `logger: false/true`."""
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return None if logger is None or isinstance(logger, bool) else logger.get("init_args")


def runs_root(logger: Any) -> Path:
    """The folder holding a logger's version_N run folders: save_dir/name."""
    settings = logger_settings(logger)
    if settings is None or settings.get("save_dir") is None:
        raise UserError("--ckpt_path last/best needs a logger with a save_dir (as in configs/base.yaml)")
    return Path(settings.save_dir) / (settings.get("name") or "")


def continue_run_folder(logger: Any, checkpoint: Path) -> None:
    """When resuming from runs/NAME/version_N/checkpoints/*.ckpt, log into version_N again."""
    settings = logger_settings(logger)
    folder = checkpoint.resolve().parent
    if settings is None or settings.get("save_dir") is None or folder.name != "checkpoints":
        return
    if folder.parent.parent == runs_root(logger).resolve() and folder.parent.name.startswith("version_"):
        version = folder.parent.name.removeprefix("version_")
        settings.version = int(version) if version.isdigit() else folder.parent.name


class TakeBackRunFolders(L.Callback):
    """When the command fails (Ctrl-C and SIGTERM included), removes the run folders it claimed and left empty;
    as the last callback it runs after the others have saved what they save."""

    def __init__(self, folders: list[NewRunFolder | None]) -> None:
        self.folders = folders

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.take_back()

    def take_back(self) -> None:
        """Remove the claimed folders that hold no checkpoint or metrics (also for failures outside the Trainer)."""
        for folder in self.folders:
            remove_unfinished_run_folder(folder)
