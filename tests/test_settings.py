"""The one table of settings kinds: complete, and the decisions read from it are the ones the code makes."""

import inspect

from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.training import settings
from fmnist_lightning.training.settings import DATA_SETTINGS, MODEL_SETTINGS, Kind


def test_every_model_and_data_argument_is_classified():
    # A new argument must be given a kind here: otherwise a resume, a checkpoint's settings or the split check
    # would treat it by accident.
    assert set(inspect.signature(FashionMNISTClassifier).parameters) == set(MODEL_SETTINGS)
    assert set(inspect.signature(FashionMNISTDataModule).parameters) == set(DATA_SETTINGS)


def test_settings_typed_as_paths_are_the_ones_marked_as_paths():
    # The checkpoint allow-list treats these as data: each must be typed as text, so that LightningCLI never
    # imports its value.
    for name in settings.PATH_MODEL_SETTINGS:
        annotation = inspect.signature(FashionMNISTClassifier).parameters[name].annotation
        assert "str" in str(annotation), (name, annotation)


def test_the_decisions_read_from_the_table():
    assert set(settings.SPEED_MODEL_SETTINGS) == {
        "compile", "channels_last", "cuda_graph", "pool_before_relu",
        "optimizer.init_args.fused", "optimizer.init_args.foreach",
    }  # fmt: skip
    assert set(settings.MODEL_DEFINING_SETTINGS) == {
        "architecture", "depth", "width", "normalize", "batch_norm", "dropout", "temperature",
    }  # fmt: skip
    assert settings.SPLIT_SETTINGS == ("data.val_size", "data.split_seed")
    assert {"data.data_dir", "data.eval_batch_size", "model.compile"} <= settings.FREE_SETTINGS
    assert not {"data.batch_size", "data.val_size", "model.dropout", "model.teacher"} & settings.FREE_SETTINGS
    assert settings.ARCHITECTURE_SETTINGS == {
        "batch_norm": "original", "dropout": "original", "depth": "resnet", "width": "resnet",
        "pretrained": "mobilenet_v2",
    }  # fmt: skip
    assert set(settings.data_settings(Kind.SPLIT, Kind.LOCATION)) == {
        "data_dir", "system_dir", "download", "val_size", "split_seed",
    }  # fmt: skip
