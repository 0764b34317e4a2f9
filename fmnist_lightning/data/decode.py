"""Any image Pillow reads (a file, or bytes received over HTTP), brought to what the model was trained on:
28x28 grayscale, light on dark. numpy and Pillow only, so a server without torch can use it too.

Steps: to grayscale, inverted if its border is light, longest side shrunk to 28, padded with black to square.
"""

import os
import stat
import warnings
from enum import Enum
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIDE = 28
# Checked before decoding: a small file can declare billions of pixels ("decompression bomb").
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 256 * 2**20
NOT_REGULAR = "not a regular file (pipe, device or broken link)"


class TooManyPixels(ValueError):
    """An image over MAX_PIXELS: refused from its header, before its pixels are decoded."""


class Invert(str, Enum):
    """Whether to turn dark-on-light pictures into Fashion-MNIST's light-on-dark."""

    AUTO = "auto"  # decide from the border pixels
    ALWAYS = "always"
    NEVER = "never"


ImageSource = str | os.PathLike | BinaryIO  # a file's path, or bytes already received (io.BytesIO)


def load_image(source: ImageSource, invert: Invert = Invert.AUTO) -> np.ndarray:
    """A 28x28 uint8 array ready for the model; raises ValueError with a short reason for a bad image."""
    return prepare_image(source, invert)[0]


def prepare_image(source: ImageSource, invert: Invert = Invert.AUTO) -> tuple[np.ndarray, bool]:
    """`load_image`'s array, and whether it was inverted (the demo shows that decision).

    A path must name a regular file of at most MAX_FILE_BYTES; a stream's size is its sender's to limit.
    """
    if isinstance(source, str | os.PathLike):
        check_regular_file(source)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning; the limit below refuses such files
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image_file = Image.open(source)
        with image_file as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise TooManyPixels(
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
