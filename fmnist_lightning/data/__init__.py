"""The data: the official files and their checks, the DataModule, in-memory batches, augmentation, image files."""

from fmnist_lightning.data.datamodule import DEFAULT_DATA_DIR, NUM_CLASSES, FashionMNISTDataModule, load_split

__all__ = ["DEFAULT_DATA_DIR", "NUM_CLASSES", "FashionMNISTDataModule", "load_split"]
