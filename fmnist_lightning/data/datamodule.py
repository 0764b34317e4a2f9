"""The Fashion-MNIST DataModule: the official files, a seeded validation split and uint8 batches.

Batches stay uint8 until the model scales them on its device, which keeps host memory and transfers small.
"""

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import FashionMNIST

from fmnist_lightning.data.augment import BatchAugment
from fmnist_lightning.data.batches import (
    EpochShuffleSampler,
    ResumableDataLoader,
    TensorBatchDataset,
    already_collated,
)
from fmnist_lightning.data.decode import Invert
from fmnist_lightning.data.files import SYSTEM_DATA_DIR, check_split_files, ensure_dataset, split_paths
from fmnist_lightning.data.images import ImageFileDataset, collate_image_records
from fmnist_lightning.errors import UserError

NUM_CLASSES = 10
DEFAULT_DATA_DIR = "data"


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST from torchvision's files, held in memory as uint8 tensors.

    Args:
        data_dir: Folder holding (or receiving) the files in torchvision's layout.
        batch_size: Images per training batch (per process under DDP).
        eval_batch_size: Images per validation/test/predict batch (metrics are exact sums); None: `batch_size`.
        val_size: Held-out part of the 60,000 training images: a fraction in (0, 1) or an image count; 0 trains
            on all of them without validation, so the last epoch's checkpoint is the one tested.
        split_seed: Seed of the train/validation split, independent of the run's seed.
        shuffle_seed: Seed of the training order; epoch `e` is shuffled with `shuffle_seed + e`.
        system_dir: Where the operating system's copy lives (Debian/Ubuntu's `dataset-fashion-mnist`).
        download: Whether torchvision may download the files when no local copy is found.
        data_on_device: Move each split to the accelerator once, so batches are cut there.
        predict_paths: Image files, folders (recursive) or globs for `predict`; None: the official test set.
        invert: For `predict_paths`: "auto" makes light-bordered pictures light-on-dark; "always"/"never" force it.
        num_workers: DataLoader processes decoding image files for `predict_paths`.
        translate: Training augmentation: random shift of up to this many pixels (0: off).
        flip: Training augmentation: random horizontal flip.
        erase: Training augmentation: probability of erasing a random rectangle (0: off).
        rotate: Training augmentation: random rotation of up to this many degrees either way (0: off).
        zoom: Training augmentation: random scaling by 1 +- up to this fraction, e.g. 0.1 (0: off).
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        batch_size: int = 64,
        eval_batch_size: int | None = 500,
        val_size: int | float = 0.2,
        split_seed: int = 42,
        shuffle_seed: int = 0,
        system_dir: str = str(SYSTEM_DATA_DIR),
        download: bool = True,
        data_on_device: bool = True,
        predict_paths: list[str] | None = None,
        invert: Literal["auto", "always", "never"] = "auto",
        num_workers: int = 0,
        translate: int = 0,
        flip: bool = False,
        erase: float = 0.0,
        rotate: float = 0.0,
        zoom: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise UserError(f"data.{name} must be at least 1, got {value}")
        if val_size < 0:
            raise UserError(f"data.val_size must be a fraction in (0, 1) or a number of images, got {val_size}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be 0 (decode in the main process) or more, got {num_workers}")
        if predict_paths is not None and not predict_paths:
            raise UserError(
                "data.predict_paths is an empty list; give image files, folders or globs, "
                "or leave it unset to predict the official test set"
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.system_dir = Path(system_dir)
        self.download = download
        self.data_on_device = data_on_device
        self.predict_paths = predict_paths
        self.invert = Invert(invert)
        self.num_workers = num_workers
        try:
            self.augment = BatchAugment(translate, flip, erase, rotate, zoom)
        except ValueError as error:
            raise UserError(f"data: {error}") from None
        self.train_set: TensorBatchDataset | None = None
        self.val_set: TensorBatchDataset | None = None
        self.test_set: TensorBatchDataset | None = None

    def prepare_data(self) -> None:
        if self._predicting_files():
            return  # the user's own pictures need no dataset
        ensure_dataset(self.data_dir, self.system_dir, download=self.download)
        # Refuse an impossible split now, before the run creates its log folder.
        held_out_count(check_split_files(*split_paths(self.data_dir, "train")), self.val_size)

    def setup(self, stage: str) -> None:
        if stage == "validate" and not self.validating:
            raise UserError(
                "data.val_size is 0: the run held no training images out for validation; "
                "score it with `fmnist test`, or validate and calibrate a run trained with data.val_size > 0"
            )
        if stage in ("fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = self._split(load_split(self.data_dir, train=True))
        if stage == "fit" and self.batch_size > len(self.train_set):
            raise UserError(
                f"data.batch_size {self.batch_size:,} is more than the {len(self.train_set):,} training images: "
                f"every epoch would be one smaller batch; choose at most {len(self.train_set):,}"
            )
        if (stage == "test" or (stage == "predict" and not self.predict_paths)) and self.test_set is None:
            self.test_set = self._on_device(load_split(self.data_dir, train=False))

    @property
    def validating(self) -> bool:
        """Whether part of the training images is held out: data.val_size 0 trains on all of them."""
        return self.val_size != 0

    def _split(self, full: TensorBatchDataset) -> tuple[TensorBatchDataset, TensorBatchDataset]:
        val_count = held_out_count(len(full), self.val_size)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed))
        val_index, train_index = order[:val_count], order[val_count:]
        train = TensorBatchDataset(full.images[train_index], full.labels[train_index])
        val = TensorBatchDataset(full.images[val_index], full.labels[val_index])
        return self._on_device(train), self._on_device(val)

    def _on_device(self, split: TensorBatchDataset) -> TensorBatchDataset:
        if not self.data_on_device or self.trainer is None:
            return split
        return split.to(self.trainer.strategy.root_device)

    def train_dataloader(self) -> DataLoader:
        train_set = self._require(self.train_set, "fit")
        return ResumableDataLoader(
            train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(train_set), self.shuffle_seed),
            collate_fn=already_collated,
        )

    def val_dataloader(self) -> DataLoader:
        return self._in_order(self._require(self.val_set, "validate"))

    def test_dataloader(self) -> DataLoader:
        return self._in_order(self._require(self.test_set, "test"))

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_paths:
            return self._in_order(self._require(self.test_set, "predict"))
        return DataLoader(
            ImageFileDataset(self.predict_paths, self.invert),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_image_records,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches on the device they landed on, a whole batch at once."""
        training = self.trainer is not None and self.trainer.training
        if self.augment.active and training and isinstance(batch, tuple | list):  # not the summary's example
            images, labels = batch
            return self.augment(images), labels
        return batch

    def _predicting_files(self) -> bool:
        return bool(self.predict_paths) and self.trainer is not None and self.trainer.predicting

    def _in_order(self, split: TensorBatchDataset) -> DataLoader:
        return DataLoader(split, batch_size=self.eval_batch_size, shuffle=False, collate_fn=already_collated)

    @staticmethod
    def _require(split: TensorBatchDataset | None, stage: str) -> TensorBatchDataset:
        if split is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its dataloader")
        return split


def held_out_count(total: int, val_size: int | float) -> int:
    """How many of `total` training images to hold out: a float is a fraction, an int a count."""
    if val_size == 0:
        return 0  # train on every image
    count = val_size if isinstance(val_size, int) else round(total * val_size) if val_size < 1 else 0
    if not 0 < count < total:
        raise UserError(
            f"data.val_size={val_size} asks for {count:,} of the {total:,} training images for validation; "
            f"use a fraction in (0, 1), a count between 1 and {total - 1:,}, or 0 to train on all of them"
        )
    return count


def official_test_set(
    data_dir: str | Path, system_dir: str | Path = SYSTEM_DATA_DIR, download: bool = False
) -> TensorBatchDataset:
    """The official 10,000 test images, found (or fetched) and checked as the DataModule does: for the commands
    that score a model outside the Trainer (the demo, export)."""
    ensure_dataset(data_dir, Path(system_dir), download=download)
    return load_split(data_dir, train=False)


def load_split(data_dir: str | Path, train: bool) -> TensorBatchDataset:
    """An official split read by torchvision (files checked by `ensure_dataset`); images N x 1 x 28 x 28 uint8."""
    dataset = FashionMNIST(str(data_dir), train=train, download=False)
    return TensorBatchDataset(dataset.data.unsqueeze(1).contiguous(), dataset.targets)
