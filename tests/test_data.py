"""The DataModule: splits, batches, shuffling and the resumable training loader."""

import pytest
import torch

from fmnist_lightning.data.batches import (
    EpochShuffleSampler,
    ResumableDataLoader,
    TensorBatchDataset,
    already_collated,
)
from fmnist_lightning.data.datamodule import FashionMNISTDataModule, held_out_count
from fmnist_lightning.errors import UserError


def datamodule(data_dir, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_validation_split_holds_out_20_percent_like_the_original(tiny_data_dir):
    dm = datamodule(tiny_data_dir)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (320, 80, 100)
    assert held_out_count(60_000, 0.2) == 12_000


def test_validation_size_can_be_a_count(tiny_data_dir):
    dm = datamodule(tiny_data_dir, val_size=50)
    assert (len(dm.train_set), len(dm.val_set)) == (350, 50)


@pytest.mark.parametrize("val_size", [400, 1000, 1.0, 0.0001])
def test_impossible_validation_sizes_are_refused(tiny_data_dir, val_size):
    with pytest.raises(UserError, match="val_size"):
        datamodule(tiny_data_dir, val_size=val_size)


def test_validation_size_zero_trains_on_every_image_and_refuses_to_validate(tiny_data_dir):
    dm = datamodule(tiny_data_dir, val_size=0)
    assert (len(dm.train_set), len(dm.val_set), dm.validating) == (400, 0, False)
    with pytest.raises(UserError, match="held no training images out for validation"):
        dm.setup("validate")


@pytest.mark.parametrize("batch_size", [0, -64])
def test_batch_size_must_be_positive(tiny_data_dir, batch_size):
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        FashionMNISTDataModule(data_dir=str(tiny_data_dir), batch_size=batch_size)


def split_ids(dm: FashionMNISTDataModule) -> tuple[set, set]:
    """Identify images by their bytes, which are unique in the tiny data."""
    return (
        {bytes(img.numpy()) for img in dm.train_set.images},
        {bytes(img.numpy()) for img in dm.val_set.images},
    )


def test_split_is_disjoint_seeded_and_independent_of_the_global_seed(tiny_data_dir):
    torch.manual_seed(1)
    train_a, val_a = split_ids(datamodule(tiny_data_dir, split_seed=7))
    torch.manual_seed(2)
    train_b, val_b = split_ids(datamodule(tiny_data_dir, split_seed=7))
    _, val_c = split_ids(datamodule(tiny_data_dir, split_seed=8))

    assert not train_a & val_a
    assert len(train_a | val_a) == 400
    assert (train_a, val_a) == (train_b, val_b)
    assert val_a != val_c


def test_batches_are_uint8_images_with_int64_labels(tiny_data_dir):
    dm = datamodule(tiny_data_dir, batch_size=32)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (32,)
    assert labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) <= 9
    assert int(images.max()) == 220  # the tiny data's bright bar: raw 0-255 pixels, scaled by the model


def test_loaders_cover_each_split_once_per_epoch(tiny_data_dir):
    dm = datamodule(tiny_data_dir, batch_size=64)
    for loader, split in ((dm.train_dataloader(), dm.train_set), (dm.val_dataloader(), dm.val_set)):
        labels = torch.cat([batch[1] for batch in loader])
        assert len(labels) == len(split)
        assert torch.equal(labels.sort().values, split.labels.sort().values)
    test_labels = torch.cat([batch[1] for batch in dm.test_dataloader()])
    assert torch.equal(test_labels, dm.test_set.labels)  # in order


def test_training_order_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(100, seed=3)
    first = list(sampler)
    torch.manual_seed(123)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(second) == list(range(100))


def make_loader(n: int = 100, batch_size: int = 10) -> ResumableDataLoader:
    dataset = TensorBatchDataset(torch.arange(n).view(n, 1, 1, 1).to(torch.uint8), torch.arange(n))
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=EpochShuffleSampler(n, seed=0), collate_fn=already_collated
    )


def test_resumed_loader_skips_the_batches_already_trained_on():
    uninterrupted = [labels.tolist() for _, labels in make_loader()]

    interrupted = make_loader()
    batches = iter(interrupted)
    for _ in range(4):
        next(batches)
    state = interrupted.state_dict()
    assert state == {"batches_done": 4}

    resumed = make_loader()
    resumed.load_state_dict(state)
    assert [labels.tolist() for _, labels in resumed] == uninterrupted[4:]
    assert [labels.tolist() for _, labels in resumed] == uninterrupted  # the skip applies once


def test_a_finished_epoch_is_saved_as_position_zero():
    loader = make_loader()
    list(loader)
    assert loader.state_dict() == {"batches_done": 0}
