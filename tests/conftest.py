"""Shared fixtures: a tiny valid Fashion-MNIST in torchvision's layout, and the real one when installed."""

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from fmnist_lightning.data.files import RAW_FILE_NAMES, SYSTEM_DATA_DIR, ensure_dataset, raw_folder
from fmnist_lightning.training.threads import FIXED_THREADS_ENV
from helpers import run_main, tiny_fit_args, write_tiny_dataset

# Tests compare runs bit for bit; a fixed thread count keeps that true while other work shares the machine
# (tests/test_threads.py checks the adaptation itself).
os.environ.setdefault(FIXED_THREADS_ENV, str(torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir with 400 training and 100 test images in torchvision's layout; tests must not change it."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    write_tiny_dataset(raw_folder(data_dir))
    return data_dir


@pytest.fixture
def tiny_system_dir(tmp_path: Path, tiny_data_dir: Path) -> Path:
    """A stand-in for /usr/share/datasets/fashion-mnist: the tiny files, gzipped."""
    system_dir = tmp_path / "system"
    system_dir.mkdir()
    for name in RAW_FILE_NAMES:
        with gzip.open(system_dir / f"{name}.gz", "wb") as archive:
            archive.write((raw_folder(tiny_data_dir) / name).read_bytes())
    return system_dir


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official files, unpacked from the system copy; tests using it are skipped where it is absent."""
    if not all((SYSTEM_DATA_DIR / f"{name}.gz").is_file() for name in RAW_FILE_NAMES):
        pytest.skip(f"real Fashion-MNIST not installed in {SYSTEM_DATA_DIR} (apt-get install dataset-fashion-mnist)")
    data_dir = tmp_path_factory.mktemp("real-data")
    ensure_dataset(data_dir, download=False)
    return data_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best checkpoint of a 2-epoch fit on the tiny data (read-only by convention)."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    run_main("fit", *tiny_fit_args(tiny_data_dir), cwd=workdir)
    return next((workdir / "runs" / "base" / "version_0" / "checkpoints").glob("best-*.ckpt"))


@pytest.fixture(scope="session")
def weak_checkpoint(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model stopped after 3 training batches: it gets about half the tiny test set wrong (the 2-epoch one
    gets none), so it has mistakes to show and explain."""
    workdir = tmp_path_factory.mktemp("weak-run")
    run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=1), "--trainer.limit_train_batches", "3", cwd=workdir)
    return next((workdir / "runs" / "base" / "version_0" / "checkpoints").glob("best-*.ckpt"))


@pytest.fixture(scope="session")
def workspace(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with its own copy of the data and one finished 2-epoch run (tests work on copies of it)."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_data_dir, root / "data")
    run_main("fit", *tiny_fit_args(root / "data", epochs=2), cwd=root)
    return root
