"""Checks on the official dataset, and the original recipe reproduced end to end (CI installs the data)."""

import re

import pytest
import torch

from fmnist_lightning.data.datamodule import load_split
from fmnist_lightning.network import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from helpers import BASE_CONFIG, run_cli

pytestmark = pytest.mark.real_data


def test_official_splits_have_60000_and_10000_balanced_images(real_data_dir):
    for train, total, per_class in ((True, 60_000, 6_000), (False, 10_000, 1_000)):
        split = load_split(real_data_dir, train=train)
        assert split.images.shape == (total, 1, 28, 28)
        assert split.images.dtype == torch.uint8
        assert torch.equal(split.labels.unique(), torch.arange(10))
        assert torch.bincount(split.labels).tolist() == [per_class] * 10


def test_normalisation_constants_are_the_training_set_statistics(real_data_dir):
    pixels = load_split(real_data_dir, train=True).images.double() / 255
    assert float(pixels.mean()) == pytest.approx(FASHION_MNIST_MEAN, abs=5e-5)
    assert float(pixels.std()) == pytest.approx(FASHION_MNIST_STD, abs=5e-5)


@pytest.mark.slow
def test_base_recipe_reaches_the_originals_test_accuracy(real_data_dir, tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(BASE_CONFIG),
        "--data.data_dir",
        str(real_data_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--test_after_fit",
        "true",
        cwd=tmp_path,
        timeout=1200,
    )
    accuracy = float(re.search(r"test:\s+accuracy (\d\.\d+)", result.stdout).group(1))
    assert accuracy >= 0.90, result.stdout[-2000:]
