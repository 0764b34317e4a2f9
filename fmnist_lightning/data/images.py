"""Image files found from paths, folders and globs, streamed to `fmnist predict` as prediction records;
each file is decoded by `decode.load_image`."""

import os
import stat
from collections.abc import Iterator
from glob import has_magic
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fmnist_lightning.data.decode import NOT_REGULAR, SIDE, Invert, load_image

FileBatch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]  # images, labels, paths, errors
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".ico"}
)


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
