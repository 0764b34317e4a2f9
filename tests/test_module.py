"""The model: the original architecture, its preprocessing, and what it logs."""

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import ModelSummary

from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.network import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputScaling, original_cnn

# The original Keras summary: (layer, output shape without batch, parameters).
KERAS_SUMMARY = [
    ("conv2d", (26, 26, 32), 320),
    ("max_pooling2d", (13, 13, 32), 0),
    ("conv2d_1", (11, 11, 64), 18_496),
    ("max_pooling2d_1", (5, 5, 64), 0),
    ("conv2d_2", (3, 3, 64), 36_928),
    ("flatten", (576,), 0),
    ("dense", (64,), 36_928),
    ("dense_1", (10,), 650),
]


def test_the_network_has_exactly_the_originals_93322_parameters():
    assert sum(p.numel() for p in original_cnn().parameters()) == 93_322
    assert sum(p.numel() for p in FashionMNISTClassifier().parameters()) == 93_322


def test_fit_start_summary_matches_the_keras_summary_layer_by_layer():
    summary = ModelSummary(FashionMNISTClassifier(), max_depth=2)
    rows = {
        name: (out_size, params)
        for name, out_size, params in zip(summary.layer_names, summary.out_sizes, summary.param_nums, strict=True)
    }
    for keras_name, keras_shape, keras_params in KERAS_SUMMARY:
        out_size, params = rows[f"network.{keras_name}"]
        channels_last_shape = (*out_size[2:], out_size[1]) if len(out_size) == 4 else tuple(out_size[1:])
        assert (channels_last_shape, params) == (keras_shape, keras_params), keras_name
    assert summary.total_parameters == 93_322


def test_weights_start_like_keras_glorot_uniform_with_zero_biases():
    torch.manual_seed(0)
    network = original_cnn()
    dense = network.dense
    limit = (6 / (576 + 64)) ** 0.5
    assert float(dense.weight.abs().max()) <= limit
    assert float(dense.weight.abs().max()) > 0.9 * limit
    assert all(float(layer.bias.abs().max()) == 0 for layer in network if hasattr(layer, "bias"))


def test_uint8_and_unit_float_inputs_give_the_same_logits():
    model = FashionMNISTClassifier().eval()
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(model(pixels), model(pixels.float() / 255))


def test_normalisation_standardises_with_the_training_set_statistics():
    pixels = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    scaled = InputScaling(normalize=True)(pixels)
    expected = torch.tensor(
        [[[[-FASHION_MNIST_MEAN / FASHION_MNIST_STD, (1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD]]]]
    )
    torch.testing.assert_close(scaled, expected)
    torch.testing.assert_close(InputScaling(normalize=False)(pixels), torch.tensor([[[[0.0, 1.0]]]]))


def test_predict_step_returns_probabilities_and_labels():
    model = FashionMNISTClassifier().eval()
    images, labels = torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([1, 2, 3])
    out = model.predict_step((images, labels), 0)
    torch.testing.assert_close(out["probabilities"].sum(dim=1), torch.ones(3))
    assert torch.equal(out["labels"], labels)


@pytest.fixture
def fitted(tiny_data_dir, tmp_path):
    L.seed_everything(0)
    dm = FashionMNISTDataModule(data_dir=str(tiny_data_dir), batch_size=32, download=False)
    model = FashionMNISTClassifier()
    trainer = L.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm


def test_metrics_are_logged_once_per_epoch_per_stage(fitted):
    trainer, _, _ = fitted
    with open(f"{trainer.logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert {key for row in rows for key, value in row.items() if value} == {
        "epoch",
        "step",
        "train_acc",
        "train_loss",
        "val_acc",
        "val_loss",
    }
    assert [row["epoch"] for row in rows if row["val_acc"]] == ["0", "1"]
    assert [row["epoch"] for row in rows if row["train_acc"]] == ["0", "1"]


def test_logged_validation_metrics_equal_a_direct_computation(fitted):
    trainer, model, dm = fitted
    model.eval()
    with torch.no_grad():
        logits = model(dm.val_set.images)
    expected_acc = (logits.argmax(1) == dm.val_set.labels).float().mean()
    expected_loss = F.cross_entropy(logits, dm.val_set.labels)
    torch.testing.assert_close(trainer.callback_metrics["val_acc"], expected_acc)
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], expected_loss, rtol=1e-5, atol=1e-6)


def test_the_tiny_data_is_learnable(fitted):
    trainer, _, _ = fitted
    assert float(trainer.callback_metrics["val_acc"]) > 0.5
