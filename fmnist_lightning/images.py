"""Turning any image file Pillow reads into what the model was trained on: 28x28, grayscale, light on dark.

Fashion-MNIST pictures are light garments on a black background, the longest side of the garment
filling the frame. A photo is brought there in four steps: to 8-bit grayscale (16-bit, RGB, RGBA and
palette images included; transparency counts as background), inverted when its border is light (a
dark shirt on a white table becomes a light shirt on black), shrunk so its longest side is 28 pixels
keeping the aspect ratio, and padded with black to 28x28. A 28x28 grayscale picture with a dark
border is left exactly as it is.
"""

import os
from collections.abc import Iterator
from enum import Enum
from glob import has_magic, iglob
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

SIDE = 28
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".ico"}
)
# Image.open refuses files with more pixels than this ("decompression bomb"); a garment needs far fewer.
Image.MAX_IMAGE_PIXELS = 64_000_000


class Invert(str, Enum):
    """Whether to turn dark-on-light pictures into Fashion-MNIST's light-on-dark."""

    AUTO = "auto"  # decide from the border pixels
    ALWAYS = "always"
    NEVER = "never"


def load_image(path: str | os.PathLike, invert: Invert = Invert.AUTO) -> np.ndarray:
    """A 28x28 uint8 array ready for the model; raises ValueError with a short reason for a bad file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            gray = to_grayscale(image)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image: {error}") from None
    pixels = np.asarray(gray, dtype=np.uint8)
    if pixels.size == 0:
        raise ValueError("empty image")
    if invert is Invert.ALWAYS or (invert is Invert.AUTO and has_light_border(pixels)):
        pixels = 255 - pixels
    return fit_to_square(pixels)


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
    """Yield (path, problem) for each file named by `sources`: files, folders (recursive) or globs.

    Lazily (directory order), so a folder of a million files is never listed in memory at once.
    Folders yield only files with an image suffix; a file named explicitly is tried whatever its
    suffix; a source that matches nothing yields one entry with the problem.
    """
    for source in sources:
        found = False
        candidates = iglob(source, recursive=True) if has_magic(source) else iter([source])
        for candidate in candidates:
            path = Path(candidate)
            if path.is_dir():
                for file in _walk_images(path):
                    found = True
                    yield str(file), None
            elif path.exists() or not has_magic(source):
                found = True
                yield str(path), None if path.exists() else "no such file or folder"
        if not found:
            yield source, "no image files found here" if Path(source).is_dir() else "no such file or folder"


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, streamed from os.scandir (directory order), subfolders after files."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)
    for subfolder in sorted(subfolders):
        yield from _walk_images(Path(subfolder))


class ImageFileDataset(IterableDataset):
    """Streams prediction records from files, folders and globs: one record per file, good or bad.

    A record is (image, path, error): a file that cannot be read gets a black image and the reason, so
    one bad file never stops a run. With several DataLoader workers, each takes every n-th file.
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


def collate_image_records(records: list[tuple[np.ndarray, str, str]]) -> dict[str, Any]:
    """Stack records into a batch: uint8 images N x 1 x 28 x 28, labels -1 (unknown), paths, errors."""
    images, paths, errors = zip(*records, strict=True)
    return {
        "images": torch.from_numpy(np.stack(images)).unsqueeze(1),
        "labels": torch.full((len(records),), -1, dtype=torch.int64),
        "paths": list(paths),
        "errors": list(errors),
    }
