"""Test helpers: tiny IDX files written from scratch, and the real CLI run in a subprocess."""

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import ModuleType

import lightning as L
import numpy as np
import torch

from fmnist_lightning.cli import main
from fmnist_lightning.data.files import SPLIT_FILES
from fmnist_lightning.outputs import atomic_write
from fmnist_lightning.training.checkpoints import SafeCheckpointIO

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "base.yaml"
TINY_TRAIN_PER_CLASS = 40
TINY_TEST_PER_CLASS = 10


def load_script(name: str) -> ModuleType:
    """A tool under scripts/ (not part of the package) imported as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000 0x08 ndim, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def declared_size_png(path, width, height):
    """A valid PNG header declaring width x height pixels, with almost no pixel data: a few hundred bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(4)), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def tiny_split(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k is faint noise with a bright bar whose row and length depend on k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        row = 3 + 2 * int(label)
        image[row : row + 2, 4 : 10 + 1 * int(label)] = 220
    return images, labels


def write_tiny_dataset(raw: Path) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for split, per_class, seed in (("train", TINY_TRAIN_PER_CLASS, 0), ("test", TINY_TEST_PER_CLASS, 1)):
        images, labels = tiny_split(per_class, seed)
        images_name, labels_name = SPLIT_FILES[split]
        write_idx(raw / images_name, images)
        write_idx(raw / labels_name, labels)


def cli_environment() -> dict[str, str]:
    """The package and tests/ (for the helper callbacks above) importable, output unbuffered."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "PYTHONUNBUFFERED": "1"}
    env.pop("FMNIST_DEBUG", None)
    return env


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = cli_environment()
    result = subprocess.run(
        [sys.executable, "-m", "fmnist_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fmnist {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def run_main(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process, from `cwd`, as `run_cli` runs it in a new one: exit status,
    what it printed. For every test where no process boundary (exit by signal, kill, DDP) is under test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    previous_cwd, previous_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["fmnist"]  # LightningCLI warns when pytest's own arguments are there beside `args`
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(args))
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.chdir(previous_cwd)
        sys.argv = previous_argv
    result = subprocess.CompletedProcess(["fmnist", *args], status, stdout.getvalue(), stderr.getvalue())
    if check and status != 0:
        raise AssertionError(f"fmnist {' '.join(args)} failed ({status}):\n{result.stderr[-3000:]}")
    return result


def tiny_fit_args(data_dir: Path, epochs: int = 2) -> list[str]:
    """The base recipe, shrunk to the tiny data and a fast run."""
    return [
        "--config",
        str(BASE_CONFIG),
        "--data.data_dir",
        str(data_dir),
        "--data.download",
        "false",
        "--data.batch_size",
        "32",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.enable_progress_bar",
        "false",
    ]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content, to prove a failing command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Callbacks and plugins that the CLI loads by class path in the reliability tests (tests/ is on PYTHONPATH).


class SlowSteps(L.Callback):
    """Makes every training step last a while, so a test can interrupt a run at a chosen moment."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class StallingCheckpointIO(SafeCheckpointIO):
    """Stalls in the middle of its n-th checkpoint write (half the bytes written), so a test can kill it there."""

    def __init__(self, stall_on_save: int, marker: str) -> None:
        super().__init__()
        self.stall_on_save = stall_on_save
        self.marker = marker
        self.saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves != self.stall_on_save:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(path) as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            Path(self.marker).write_text(str(path))
            time.sleep(600)  # killed here


class RecordTrainImages(L.Callback):
    """Writes, per process, a fingerprint of every training image it saw in the first epoch."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen += [hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest() for image in batch[0]]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def stopped_while_drawing(stop: str):
    """A stand-in for `plots.write_figure` that writes half a picture, then is stopped by a real SIGTERM (through
    the command's own handler) or by Ctrl-C."""

    def interrupted(figure, file, image_format) -> None:
        file.write(b"half a picture")
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    return interrupted


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """The CLI in the background, for tests that interrupt it."""
    return subprocess.Popen(
        [sys.executable, "-m", "fmnist_lightning", *args],
        cwd=cwd,
        env=cli_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
