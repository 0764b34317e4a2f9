"""Finding the Fashion-MNIST files: in the data folder, in the system copy, or from the official mirrors.

Everything lands in torchvision's layout (`DATA_DIR/FashionMNIST/raw/*-ubyte`), so that
`torchvision.datasets.FashionMNIST(DATA_DIR)` reads it. Every file is written under a temporary name
and renamed into place when complete: a process killed half-way never leaves a file that later passes
for data.
"""

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

from fmnist_lightning.atomic import atomic_write, ensure_output_path, new_folders_removed_on_error
from fmnist_lightning.errors import DataError
from fmnist_lightning.idx import check_split_files

# Where Debian/Ubuntu's `dataset-fashion-mnist` package installs the official gzipped files.
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
RAW_FILE_NAMES = tuple(name for pair in SPLIT_FILES.values() for name in pair)

HOW_TO_GET_THE_DATA = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or run once with internet access so torchvision can download it"
)


def raw_folder(data_dir: str | os.PathLike) -> Path:
    """The folder torchvision's FashionMNIST reads its unpacked IDX files from."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def split_paths(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of the "train" or "test" split."""
    images_name, labels_name = SPLIT_FILES[split]
    return raw_folder(data_dir) / images_name, raw_folder(data_dir) / labels_name


def ensure_dataset(data_dir: str | os.PathLike, system_dir: Path = SYSTEM_DATA_DIR, download: bool = True) -> str:
    """Make sure all four files are in `data_dir` and valid; return where they came from.

    Sources are tried in order: the data folder itself, the system copy, torchvision's download.
    """
    raw = raw_folder(data_dir)
    source = "data_dir"
    if _missing(raw):
        ensure_output_path(raw, "--data.data_dir", is_folder=True)
        with new_folders_removed_on_error(raw):
            source = _fill_from_system_copy(raw, system_dir)
            if _missing(raw) and download:
                source = _fill_from_download(raw, system_dir)
            if missing := _missing(raw):
                raise DataError(
                    f"Fashion-MNIST not found: {', '.join(missing)} missing in {raw} and in {system_dir}"
                    f"{'' if download else ' (download disabled)'}; {HOW_TO_GET_THE_DATA}"
                )
    for split in SPLIT_FILES:
        check_split_files(*split_paths(data_dir, split))
    return source


def _missing(raw: Path) -> list[str]:
    return [name for name in RAW_FILE_NAMES if not (raw / name).is_file()]


def _fill_from_system_copy(raw: Path, system_dir: Path) -> str:
    archives = {name: system_dir / f"{name}.gz" for name in _missing(raw)}
    if not all(path.is_file() for path in archives.values()):
        return "data_dir"
    raw.mkdir(parents=True, exist_ok=True)
    for name, archive in archives.items():
        try:
            with gzip.open(archive, "rb") as source, atomic_write(raw / name) as target:
                shutil.copyfileobj(source, target)
        except (OSError, EOFError) as error:
            raise DataError(
                f"cannot unpack {archive} into {raw}: {error}; if the archive is damaged, "
                "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`"
            ) from error
    return "system"


def _fill_from_download(raw: Path, system_dir: Path) -> str:
    """Let torchvision download into a scratch folder, then move the complete files into place."""
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".download-") as scratch:
        try:
            for train in (True, False):
                FashionMNIST(scratch, train=train, download=True)
        except (RuntimeError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"Fashion-MNIST not found in {raw} nor in {system_dir}, and the download failed "
                f"({first_line}); {HOW_TO_GET_THE_DATA}"
            ) from error
        for name in _missing(raw):
            with open(raw_folder(scratch) / name, "rb") as source, atomic_write(raw / name) as target:
                shutil.copyfileobj(source, target)
    return "download"
