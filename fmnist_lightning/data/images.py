"""Any image file Pillow reads, brought to what the model was trained on: 28x28 grayscale, light on dark.

Steps: to grayscale, inverted if its border is light, longest side shrunk to 28, padded with black to square.
"""

import os
import stat
import warnings
from collections.abc import Iterator
from enum import Enum
from glob import has_magic
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

SIDE = 28
FileBatch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]  # images, labels, paths, errors
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".ico"}
)
# Checked before decoding: a small file can declare billions of pixels ("decompression bomb").
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 256 * 2**20
NOT_REGULAR = "not a regular file (pipe, device or broken link)"


class Invert(str, Enum):
    """Whether to turn dark-on-light pictures into Fashion-MNIST's light-on-dark."""

    AUTO = "auto"  # decide from the border pixels
    ALWAYS = "always"
    NEVER = "never"


def load_image(path: str | os.PathLike, invert: Invert = Invert.AUTO) -> np.ndarray:
    """A 28x28 uint8 array ready for the model; raises ValueError with a short reason for a bad file."""
    return prepare_image(path, invert)[0]


def prepare_image(path: str | os.PathLike, invert: Invert = Invert.AUTO) -> tuple[np.ndarray, bool]:
    """`load_image`'s array, and whether it was inverted (the demo shows that decision)."""
    check_regular_file(path)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning; the limit below refuses such files
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image_file = Image.open(path)
        with image_file as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"image declares {width}x{height} pixels, over the {MAX_PIXELS // 1_000_000} megapixel limit"
                )
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            gray = to_grayscale(image)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image: {error}") from None
    pixels = np.asarray(gray, dtype=np.uint8)
    if pixels.size == 0:
        raise ValueError("empty image")
    inverted = invert is Invert.ALWAYS or (invert is Invert.AUTO and has_light_border(pixels))
    return fit_to_square(255 - pixels if inverted else pixels), inverted


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse all but regular files (a named pipe would block open() forever) of at most MAX_FILE_BYTES."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise ValueError(f"unreadable: {error.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError("not a regular file: a folder" if stat.S_ISDIR(status.st_mode) else NOT_REGULAR)
    if status.st_size > MAX_FILE_BYTES:
        raise ValueError(f"file of {status.st_size:,} bytes, over the {MAX_FILE_BYTES // 2**20} MiB limit")


def to_grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale; 16/32-bit integer images are scaled down, transparent parts become white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" or "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image.convert("L")


def has_light_border(pixels: np.ndarray) -> bool:
    """True when the outermost rows and columns are, on average, lighter than mid-gray."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(border.mean()) > 127.5


def fit_to_square(pixels: np.ndarray) -> np.ndarray:
    """Shrink (or grow) so the longest side is 28, keeping the aspect ratio, then center on black."""
    height, width = pixels.shape
    if (height, width) == (SIDE, SIDE):
        return pixels.copy()
    scale = SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
    square = np.zeros((SIDE, SIDE), dtype=np.uint8)
    top, left = (SIDE - resized.shape[0]) // 2, (SIDE - resized.shape[1]) // 2
    square[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return square


def iter_image_paths(sources: list[str]) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for each file named by `sources` (files, folders, globs), streamed, never listed at once.

    Each real file comes once, however many links reach it; a source matching nothing yields its problem.
    """
    seen_files: set[tuple[int, int]] = set()
    seen_folders: set[tuple[int, int]] = set()
    for source in sources:
        found = False
        try:
            candidates = _glob(source) if has_magic(source) else iter([Path(source)])
            for path in candidates:
                found = True
                yield from _files_under(path, seen_files, seen_folders)
        except ValueError as error:  # pathlib's refusal of a malformed pattern
            found = True
            yield source, f"bad pattern: {error}"
        if not found:
            yield source, "no such file or folder"


def _glob(pattern: str) -> Iterator[Path]:
    """Paths matching `pattern`; unlike glob.iglob, `**` never follows links to folders (no loops)."""
    parts = Path(pattern).parts
    first_magic = next(index for index, part in enumerate(parts) if has_magic(part))
    return Path(*parts[:first_magic]).glob(str(Path(*parts[first_magic:])))


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _files_under(
    path: Path, seen_files: set[tuple[int, int]], seen_folders: set[tuple[int, int]]
) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for a file, or for each image file in a folder, skipping files already yielded."""
    try:
        status = path.stat()
    except OSError as error:
        missing = isinstance(error, FileNotFoundError) and not path.is_symlink()
        yield str(path), "no such file or folder" if missing else f"unreadable: {error.strerror}"
        return
    if not stat.S_ISDIR(status.st_mode):
        if _identity(status) not in seen_files:
            seen_files.add(_identity(status))
            yield str(path), None if stat.S_ISREG(status.st_mode) else NOT_REGULAR
        return
    if _identity(status) in seen_folders:
        return  # searched already, through another source or link
    found = False
    for file, problem in _walk_images(path, seen_folders):
        found = True
        try:
            key = _identity(file.stat())
        except OSError as error:  # a broken link, or gone since the folder was listed
            yield str(file), problem or f"unreadable: {error.strerror}"
            continue
        if key not in seen_files:
            seen_files.add(key)
            yield str(file), problem
    if not found:
        yield str(path), "no image files found here"


def _walk_images(folder: Path, seen_folders: set[tuple[int, int]]) -> Iterator[tuple[Path, str | None]]:
    """Image files under `folder` in directory order, subfolders last; links followed, no folder searched twice."""
    try:
        key = _identity(folder.stat())
    except OSError as error:
        yield folder, f"unreadable: {error.strerror}"
        return
    if key in seen_folders:
        return
    seen_folders.add(key)
    subfolders = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:  # both follow links; a link loop or a broken link is neither
                    is_folder, is_regular = entry.is_dir(), entry.is_file()
                except OSError:
                    is_folder = is_regular = False
                if is_folder:
                    subfolders.append(entry.path)
                elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield Path(entry.path), None if is_regular else NOT_REGULAR
    except OSError as error:
        yield folder, f"unreadable: {error.strerror}"
        return
    for subfolder in sorted(subfolders):
        yield from _walk_images(Path(subfolder), seen_folders)


class ImageFileDataset(IterableDataset):
    """Prediction records (image, path, error) from files, folders and globs; each worker takes every n-th file.

    An unreadable file gets a black image and its reason, so one bad file never stops a run.
    """

    def __init__(self, sources: list[str], invert: Invert = Invert.AUTO) -> None:
        self.sources = list(sources)
        self.invert = Invert(invert)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str, str]]:
        worker = get_worker_info()
        for position, (path, problem) in enumerate(iter_image_paths(self.sources)):
            if worker is not None and position % worker.num_workers != worker.id:
                continue
            if problem is None:
                try:
                    yield load_image(path, self.invert), path, ""
                    continue
                except ValueError as error:
                    problem = str(error)
            yield np.zeros((SIDE, SIDE), dtype=np.uint8), path, problem


def collate_image_records(records: list[tuple[np.ndarray, str, str]]) -> FileBatch:
    """A batch that starts like the test set's (uint8 images, labels -1), then the writer's paths and errors."""
    images, paths, errors = zip(*records, strict=True)
    labels = torch.full((len(records),), -1, dtype=torch.int64)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), labels, list(paths), list(errors)
