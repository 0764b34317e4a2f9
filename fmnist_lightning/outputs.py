"""Writing outputs safely: the path checked before anything runs, the file complete or absent after, and no
empty folders left behind by a failing command."""

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fmnist_lightning.errors import UserError


@contextmanager
def atomic_write(destination: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """A temporary file beside `destination`, renamed into place only if the block completes (else removed)."""
    destination = Path(destination)
    if destination.is_dir():  # checked first: the rename at the end would fail after all the work
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(destination))
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the permissions open() would
    try:
        with os.fdopen(handle, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `destination`, renamed into place (replacing a folder there) only if the block
    completes; else removed, with the folders created on the way to it."""
    destination = Path(destination)
    with new_folders_removed_on_error(destination.parent):
        destination.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"))
        os.chmod(scratch, 0o777 & ~_current_umask())  # mkdtemp makes 0700; give the permissions mkdir would
        try:
            yield scratch
            if destination.exists():  # a rename cannot replace a folder that holds files: move it aside first
                replaced = scratch.with_name(f"{scratch.name}.old")
                os.replace(destination, replaced)
                os.replace(scratch, destination)
                shutil.rmtree(replaced)
            else:
                os.replace(scratch, destination)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_output_path(path: str | os.PathLike, option: str, is_folder: bool = False) -> None:
    """Refuse, before anything runs and creating nothing, an output file (or folder) that could not be written."""
    path = Path(path)
    existing = nearest_existing(path)
    if existing == path.absolute():
        if existing.is_dir() != is_folder:
            found, wanted = ("a folder", "a file name") if existing.is_dir() else ("a file", "a folder")
            raise UserError(f"{path} is {found}; give {wanted} with {option}")
        folder = existing if is_folder else existing.parent
    elif existing.is_dir():
        folder = existing
    else:
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder; choose another path with {option}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"cannot write to {folder}: {error.strerror}; choose another path with {option}") from error


@contextmanager
def new_folders_removed_on_error(folder: str | os.PathLike) -> Iterator[None]:
    """On an error in the block, remove the folders it created on the way to `folder`, if left empty."""
    folder = Path(folder).absolute()
    existed = nearest_existing(folder)
    try:
        yield
    except BaseException:
        remove_empty_folders(folder, existed)
        raise


def remove_empty_folders(folder: Path, existed: Path) -> None:
    """Remove `folder` and its parents up to (not including) `existed`, stopping at the first one not empty."""
    folder = folder.absolute()
    while folder != existed and folder.is_relative_to(existed):
        if folder.is_dir():
            try:
                folder.rmdir()
            except OSError:  # not empty: something worth keeping was written there
                break
        folder = folder.parent
