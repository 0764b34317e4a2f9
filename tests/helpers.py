"""Test helpers: tiny IDX files written from scratch, and the real CLI run in a subprocess."""

import csv
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist_lightning.sources import SPLIT_FILES

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "base.yaml"
TINY_TRAIN_PER_CLASS = 40
TINY_TEST_PER_CLASS = 10


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000 0x08 ndim, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


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


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("FMNIST_DEBUG", None)
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
