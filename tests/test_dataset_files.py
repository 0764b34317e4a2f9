"""The Fashion-MNIST files: found in the data folder, the system copy or a download, checked, written atomically."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from fmnist_lightning.data import files as dataset_files
from fmnist_lightning.data.files import RAW_FILE_NAMES, ensure_dataset, raw_folder
from fmnist_lightning.errors import DataError
from helpers import write_idx, write_tiny_dataset


def no_download(*args, **kwargs):
    raise AssertionError("the download must not be tried")


def test_files_already_in_data_dir_are_used_as_they_are(tmp_path, tiny_system_dir, monkeypatch):
    write_tiny_dataset(raw_folder(tmp_path))
    monkeypatch.setattr(dataset_files, "FashionMNIST", no_download)
    before = {name: (raw_folder(tmp_path) / name).stat().st_mtime_ns for name in RAW_FILE_NAMES}

    assert ensure_dataset(tmp_path, tiny_system_dir) == "data_dir"
    assert {name: (raw_folder(tmp_path) / name).stat().st_mtime_ns for name in RAW_FILE_NAMES} == before


def test_system_copy_is_unpacked_into_data_dir(tmp_path, tiny_data_dir, tiny_system_dir, monkeypatch):
    monkeypatch.setattr(dataset_files, "FashionMNIST", no_download)

    assert ensure_dataset(tmp_path / "data", tiny_system_dir) == "system"
    for name in RAW_FILE_NAMES:
        unpacked = raw_folder(tmp_path / "data") / name
        assert unpacked.read_bytes() == (raw_folder(tiny_data_dir) / name).read_bytes()
    assert [p.name for p in raw_folder(tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def test_only_missing_files_are_taken_from_the_system_copy(tmp_path, tiny_system_dir):
    write_tiny_dataset(raw_folder(tmp_path))
    kept = raw_folder(tmp_path) / RAW_FILE_NAMES[0]
    kept_mtime = kept.stat().st_mtime_ns
    (raw_folder(tmp_path) / RAW_FILE_NAMES[1]).unlink()

    assert ensure_dataset(tmp_path, tiny_system_dir) == "system"
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (raw_folder(tmp_path) / RAW_FILE_NAMES[1]).is_file()


def test_download_is_the_last_resort(tmp_path, tiny_data_dir, monkeypatch):
    calls = []

    class FakeFashionMNIST:
        """Stands in for torchvision's class: 'downloads' by copying the tiny files into its root."""

        def __init__(self, root, train, download):
            calls.append((train, download))
            shutil.copytree(raw_folder(tiny_data_dir), raw_folder(root), dirs_exist_ok=True)

    monkeypatch.setattr(dataset_files, "FashionMNIST", FakeFashionMNIST)

    assert ensure_dataset(tmp_path / "data", tmp_path / "no-system-copy") == "download"
    assert calls == [(True, True), (False, True)]
    assert sorted(p.name for p in raw_folder(tmp_path / "data").iterdir()) == sorted(RAW_FILE_NAMES)
    assert [p.name for p in raw_folder(tmp_path / "data").parent.iterdir()] == ["raw"]  # scratch removed


def test_no_source_gives_one_error_naming_both_ways_to_get_the_data(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\nno network")

    monkeypatch.setattr(dataset_files, "FashionMNIST", offline)

    with pytest.raises(DataError) as error:
        ensure_dataset(tmp_path / "data", tmp_path / "no-system-copy")
    message = str(error.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "internet access" in message
    assert "Error downloading train-images-idx3-ubyte.gz" in message


def test_download_disabled_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_files, "FashionMNIST", no_download)
    with pytest.raises(DataError, match="download disabled"):
        ensure_dataset(tmp_path / "data", tmp_path / "no-system-copy", download=False)


def damage(raw: Path, name: str, how: str) -> None:
    path = raw / name
    content = path.read_bytes()
    if how == "bad magic":
        path.write_bytes(b"\x1f\x8b\x08\x00" + content[4:])
    elif how == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif how == "trailing bytes":
        path.write_bytes(content + b"\x00" * 10)
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        ("train-images-idx3-ubyte", "bad magic", "bad magic number"),
        ("train-labels-idx1-ubyte", "bad magic", "bad magic number"),
        ("t10k-images-idx3-ubyte", "truncated", "is truncated"),
        ("t10k-labels-idx1-ubyte", "trailing bytes", "bytes more than its header announces"),
        ("train-images-idx3-ubyte", "empty", "bad magic number"),
    ],
)
def test_damaged_files_are_refused_with_their_name(tmp_path, name, how, message):
    raw = raw_folder(tmp_path)
    write_tiny_dataset(raw)
    damage(raw, name, how)

    with pytest.raises(DataError, match=message) as error:
        ensure_dataset(tmp_path, tmp_path / "no-system-copy", download=False)
    assert str(raw / name) in str(error.value)


def test_image_and_label_counts_must_agree(tmp_path):
    raw = raw_folder(tmp_path)
    write_tiny_dataset(raw)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))

    with pytest.raises(DataError, match=r"400 images but .* 7 labels"):
        ensure_dataset(tmp_path, tmp_path / "no-system-copy", download=False)


def test_images_must_be_28_by_28(tmp_path):
    raw = raw_folder(tmp_path)
    write_tiny_dataset(raw)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((100, 32, 32), dtype=np.uint8))

    with pytest.raises(DataError, match="32x32 images"):
        ensure_dataset(tmp_path, tmp_path / "no-system-copy", download=False)


def test_a_broken_system_archive_leaves_no_partial_file(tmp_path, tiny_system_dir):
    archive = tiny_system_dir / "train-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:200])

    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        ensure_dataset(tmp_path / "data", tiny_system_dir, download=False)
    assert not (raw_folder(tmp_path / "data") / "train-images-idx3-ubyte").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system"]  # no partial file, no folder left behind
