"""Export round trips: ONNX (onnxruntime) and TorchScript agree with PyTorch; the JSON describes the model."""

import hashlib
import json

import numpy as np
import pytest
import torch

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.export import ProbabilityModel, export_checkpoint
from fmnist_lightning.data.datamodule import load_split
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from helpers import run_main


def reference_probabilities(checkpoint, images):
    model, _ = FashionMNISTClassifier.from_checkpoint(checkpoint)
    with torch.inference_mode():
        return ProbabilityModel(model).eval()(images).numpy()


def test_onnx_export_matches_pytorch_and_describes_itself(tiny_checkpoint, tiny_data_dir, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
    out = tmp_path / "model.onnx"
    model_path, metadata_path, check = export_checkpoint(tiny_checkpoint, "onnx", out, data_dir=tiny_data_dir)
    assert (model_path, metadata_path) == (out, tmp_path / "model.json")
    assert check["passed"] and check["images"] == 100
    assert check["max_abs_difference"] < 1e-4
    assert check["argmax_agreement"] == 1.0
    assert abs(check["exported_accuracy"] - check["pytorch_accuracy"]) <= 0.001

    images = load_split(tiny_data_dir, train=False).images.numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 100):  # the batch axis is dynamic
        found = session.run(["probabilities"], {"images": images[:batch]})[0]
        expected = reference_probabilities(tiny_checkpoint, torch.from_numpy(images[:batch]))
        np.testing.assert_allclose(found, expected, atol=1e-4)
        np.testing.assert_allclose(found.sum(axis=1), 1, atol=1e-5)

    metadata = json.loads(metadata_path.read_text())
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert metadata["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["batch", 1, 28, 28],
        "range": [0, 255],
        "content": "grayscale, light garment on a dark background, longest side 28 pixels, centred",
    }
    assert metadata["checkpoint"]["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert metadata["test_accuracy"] == check["exported_accuracy"]
    assert metadata["preprocessing_inside_the_model"]["normalize"] is None


def test_onnx_export_with_float_input(tiny_checkpoint, tiny_data_dir, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
    out = tmp_path / "float.onnx"
    export_checkpoint(tiny_checkpoint, "onnx", out, input_dtype="float32", data_dir=tiny_data_dir)
    images = load_split(tiny_data_dir, train=False).images[:5]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    found = session.run(["probabilities"], {"images": (images.float() / 255).numpy()})[0]
    np.testing.assert_allclose(found, reference_probabilities(tiny_checkpoint, images), atol=1e-4)
    assert json.loads(out.with_suffix(".json").read_text())["input"]["range"] == [0.0, 1.0]


def test_torchscript_export_round_trip(tiny_checkpoint, tiny_data_dir, tmp_path):
    out = tmp_path / "model.pt"
    _, _, check = export_checkpoint(tiny_checkpoint, "torchscript", out, data_dir=tiny_data_dir)
    assert check["passed"] and check["max_abs_difference"] < 1e-4
    loaded = torch.jit.load(str(out))
    images = load_split(tiny_data_dir, train=False).images[:9]
    torch.testing.assert_close(loaded(images), torch.from_numpy(reference_probabilities(tiny_checkpoint, images)))


def test_export_command_defaults_to_the_run_folder(tiny_checkpoint, tiny_data_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    copy = checkpoints / "best.ckpt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    result = run_main("export", "--ckpt_path", str(copy), "--data_dir", str(tiny_data_dir), cwd=tmp_path)
    assert (tmp_path / "run" / "best.onnx").is_file()
    assert (tmp_path / "run" / "best.json").is_file()
    assert "checked on 100 test images" in result.stdout


def test_unknown_format_is_refused(tiny_checkpoint, tiny_data_dir, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_checkpoint(tiny_checkpoint, "tflite", tmp_path / "m", data_dir=tiny_data_dir)
    assert list(tmp_path.iterdir()) == []
