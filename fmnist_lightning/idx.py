"""Checking IDX files (the format Fashion-MNIST ships in) before torchvision reads them.

torchvision trusts any file with the right name; a truncated download or a file with the wrong content
then fails deep inside a reshape. These checks read only the header and the file size, so they are cheap
enough to run on every start, and their errors name the file and the fix.
"""

import math
import struct
from pathlib import Path

from fmnist_lightning.errors import DataError

UBYTE_TYPE_CODE = 0x08
IMAGE_SIDE = 28
CLASS_COUNT = 10

FIX_HINT = "delete it and run again to get a fresh copy"


def idx_dims(path: Path, ndim: int) -> tuple[int, ...]:
    """Return the dimensions of the unsigned-byte IDX file at `path`, checking its magic number and size."""
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
    """Check an images/labels pair (headers, sizes, label range) and return the number of examples it holds."""
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
    with open(labels_path, "rb") as file:  # 60 KB at most: cheap enough to read on every start
        largest = max(file.read()[4 + 4 :], default=0)
    if largest >= CLASS_COUNT:
        raise DataError(f"{labels_path} holds labels outside 0..{CLASS_COUNT - 1} (found {largest}); {FIX_HINT}")
    return count
