"""`fmnist export`: the trained model as ONNX or TorchScript, with its preprocessing inside, written only
once it agrees with PyTorch on the whole test set; a JSON file beside it describes how to call it."""

import copy
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import nn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.data.batches import in_batches
from fmnist_lightning.data.datamodule import DEFAULT_DATA_DIR, official_test_set
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_write, ensure_output_path, new_folders_removed_on_error
from fmnist_lightning.training.run_folders import checkpoint_run_folder

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
MAX_ABS_DIFFERENCE = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
MAX_ACCURACY_GAP = 0.001

Runner = Callable[[np.ndarray], np.ndarray]


class ProbabilityModel(nn.Module):
    """Pixels in, class probabilities out: the trained network wrapped for use outside this package."""

    def __init__(self, model: FashionMNISTClassifier) -> None:
        super().__init__()
        self.input_scaling = copy.deepcopy(model.input_scaling)
        self.network = copy.deepcopy(model.network).to(memory_format=torch.contiguous_format).float()
        self.temperature = model.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.network(self.input_scaling(images)) / self.temperature).softmax(dim=1)


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    format: Literal["onnx", "torchscript"] = "onnx",
    output: str | os.PathLike | None = None,
    input_dtype: Literal["uint8", "float32"] = "uint8",
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
) -> tuple[Path, Path, dict[str, Any]]:
    """Export, check on the official test set, and write model + JSON; returns both paths and the check."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    model, _ = FashionMNISTClassifier.from_checkpoint(ckpt_path)
    checkpoint_path = Path(ckpt_path)
    destination = Path(output) if output else default_output(checkpoint_path, format)
    ensure_output_path(destination, "--output")
    test = official_test_set(data_dir, download=True)
    images = test.images.numpy() if input_dtype == "uint8" else (test.images.float() / 255).numpy()
    labels = test.labels.numpy()

    reference = ProbabilityModel(model).eval()
    with new_folders_removed_on_error(destination.parent):
        destination.parent.mkdir(parents=True, exist_ok=True)
        check = _export_checked(reference, format, images, labels, destination)
    metadata_path = destination.with_suffix(".json")
    metadata = describe(model, checkpoint_path, destination, format, input_dtype, check)
    with atomic_write(metadata_path, "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=2)
        file.write("\n")
    return destination, metadata_path, check


def _export_checked(
    reference: nn.Module, format: str, images: np.ndarray, labels: np.ndarray, destination: Path
) -> dict[str, Any]:
    """Write the model under a temporary name, check it against PyTorch, and rename it into place."""
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as scratch:
        candidate = Path(scratch) / destination.name
        write = _write_onnx if format == "onnx" else _write_torchscript
        runner = write(reference, images[:2], candidate)
        check = compare(_pytorch_runner(reference), runner, images, labels)
        if not check["passed"]:
            raise UserError(
                f"the {format} export disagrees with PyTorch on the test set (max difference "
                f"{check['max_abs_difference']:.2e}, argmax agreement {check['argmax_agreement']:.4%}); nothing written"
            )
        os.replace(candidate, destination)
    return check


def default_output(checkpoint_path: Path, format: str) -> Path:
    """runs/x/version_0/checkpoints/best.ckpt -> runs/x/version_0/best.onnx (the run's folder)."""
    return checkpoint_run_folder(checkpoint_path) / f"{checkpoint_path.stem}{FORMATS[format]}"


def _write_onnx(module: nn.Module, example: np.ndarray, path: Path) -> Runner:
    try:
        import onnxruntime
    except ImportError:
        raise UserError('ONNX export needs onnxruntime: pip install -e ".[export]"') from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        str(path),
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,  # the model is small: keep the weights inside the one .onnx file
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["probabilities"], {"images": images})[0]


def _write_torchscript(module: nn.Module, example: np.ndarray, path: Path) -> Runner:
    with warnings.catch_warnings():  # PyTorch marks TorchScript deprecated; users who ask for it know
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, torch.from_numpy(example))
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return _pytorch_runner(loaded)


def _pytorch_runner(module: nn.Module) -> Runner:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return run


def compare(reference: Runner, exported: Runner, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Run both on every image; the numbers the export must meet, and whether it meets them."""
    expected, found = in_batches(reference, images), in_batches(exported, images)
    max_difference = float(np.abs(expected - found).max())
    agreement = float((expected.argmax(1) == found.argmax(1)).mean())
    pytorch_accuracy = float((expected.argmax(1) == labels).mean())
    exported_accuracy = float((found.argmax(1) == labels).mean())
    return {
        "images": len(images),
        "max_abs_difference": max_difference,
        "argmax_agreement": agreement,
        "pytorch_accuracy": pytorch_accuracy,
        "exported_accuracy": exported_accuracy,
        "passed": max_difference < MAX_ABS_DIFFERENCE
        and agreement >= MIN_ARGMAX_AGREEMENT
        and abs(pytorch_accuracy - exported_accuracy) <= MAX_ACCURACY_GAP,
    }


def describe(
    model: FashionMNISTClassifier,
    checkpoint_path: Path,
    model_path: Path,
    format: str,
    input_dtype: str,
    check: dict[str, Any],
) -> dict[str, Any]:
    """The JSON written beside the model: everything a user needs to call it correctly."""
    scaling = model.input_scaling
    return {
        "model_file": model_path.name,
        "format": format,
        "class_names": list(CLASS_NAMES),
        "input": {
            "name": "images",
            "dtype": input_dtype,
            "shape": ["batch", 1, 28, 28],
            "range": [0, 255] if input_dtype == "uint8" else [0.0, 1.0],
            "content": "grayscale, light garment on a dark background, longest side 28 pixels, centred",
        },
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["batch", len(CLASS_NAMES)]},
        "preprocessing_inside_the_model": {
            "scale": "pixels / 255" if input_dtype == "uint8" else "none (input already in [0, 1])",
            "normalize": {"mean": float(scaling.mean), "std": float(scaling.std)} if scaling.normalize else None,
        },
        "temperature": model.temperature,  # probabilities are softmax(logits / temperature); 1: not calibrated
        "checkpoint": {"file": checkpoint_path.name, "sha256": sha256(checkpoint_path)},
        "test_set_check": check,
        "test_accuracy": check["exported_accuracy"],
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_command(args: list[str]) -> None:
    """`fmnist export --ckpt_path CKPT`: ONNX or TorchScript, checked against PyTorch on the test set."""
    parser = ArgumentParser(prog="fmnist export", description=export_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to export (.ckpt)")
    parser.add_argument("--format", default="onnx", choices=tuple(FORMATS), help="onnx (default) or torchscript")
    parser.add_argument("--output", help="model file to write (default: beside the run's checkpoints folder)")
    parser.add_argument("--input_dtype", default="uint8", choices=("uint8", "float32"), help="pixels 0-255 or 0-1")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST folder, for the test-set check")
    config = parser.parse_args(args)
    model_path, metadata_path, check = export_checkpoint(
        config.ckpt_path, config.format, config.output, config.input_dtype, config.data_dir
    )
    print(f"exported:         {model_path}")
    print(f"description:      {metadata_path}")
    print(
        f"checked on {check['images']:,} test images: max probability difference {check['max_abs_difference']:.1e}, "
        f"same class for {check['argmax_agreement']:.2%}, accuracy {check['exported_accuracy']:.4f} "
        f"(PyTorch {check['pytorch_accuracy']:.4f})"
    )
