"""The Fashion-MNIST files, from the data folder, the system copy or a download, in torchvision's layout.

Each file is written under a temporary name and renamed when complete, so a killed run never leaves a bad one.
"""

import gzip
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import DataError
from fmnist_lightning.outputs import atomic_write, ensure_output_path, new_folders_removed_on_error

UBYTE_TYPE_CODE = 0x08
IMAGE_SIDE = 28

FIX_HINT = "delete it and run again to get a fresh copy"


def idx_dims(path: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions of the unsigned-byte IDX file at `path`, after checking its magic number and size."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
            dims_bytes = file.read(4 * ndim)
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from error
    expected_magic = bytes((0, 0, UBYTE_TYPE_CODE, ndim))
    if magic != expected_magic:
        raise DataError(
            f"{path} is not a Fashion-MNIST IDX file: bad magic number "
            f"0x{magic.hex() or 'empty'} (expected 0x{expected_magic.hex()}); {FIX_HINT}"
        )
    if len(dims_bytes) < 4 * ndim:
        raise DataError(f"{path} is truncated: its header is incomplete; {FIX_HINT}")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    expected_size = 4 + 4 * ndim + math.prod(dims)
    if size < expected_size:
        raise DataError(f"{path} is truncated: {size:,} bytes, its header announces {expected_size:,}; {FIX_HINT}")
    if size > expected_size:
        raise DataError(f"{path} has {size - expected_size:,} bytes more than its header announces; {FIX_HINT}")
    return dims


def check_split_files(images_path: Path, labels_path: Path) -> int:
    """Check an images/labels pair (headers, sizes, label range); return how many examples it holds."""
    count, height, width = idx_dims(images_path, ndim=3)
    if (height, width) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{images_path} holds {height}x{width} images, Fashion-MNIST's are {IMAGE_SIDE}x{IMAGE_SIDE}; {FIX_HINT}"
        )
    (label_count,) = idx_dims(labels_path, ndim=1)
    if label_count != count:
        raise DataError(
            f"{images_path} holds {count:,} images but {labels_path} holds {label_count:,} labels; "
            f"the two files come from different downloads: {FIX_HINT}"
        )
    with open(labels_path, "rb") as file:  # 60 KB at most: cheap to read on every start
        largest = max(file.read()[4 + 4 :], default=0)
    if largest >= len(CLASS_NAMES):
        raise DataError(f"{labels_path} holds labels outside 0..{len(CLASS_NAMES) - 1} (found {largest}); {FIX_HINT}")
    return count


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
    """Download into a scratch folder so that only complete files are moved into place."""
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
