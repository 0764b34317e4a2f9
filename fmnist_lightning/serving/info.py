"""What GET /info says about an ONNX file served (the description `fmnist export` wrote beside it), the limits
and the package; `commands/serve.checkpoint_info` describes a checkpoint."""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.data.decode import MAX_PIXELS
from fmnist_lightning.errors import UserError


def package_version() -> str:
    try:
        return version("fmnist-lightning")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def onnx_info(model_file: Path) -> dict[str, Any]:
    """The ONNX file checked with onnxruntime (one N x 1 x 28 x 28 input, 10 outputs), and its export description."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError('serving an ONNX file needs onnxruntime: pip install -e ".[export]"') from None
    try:
        session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for unreadable files
        raise UserError(f"{model_file} is not an ONNX model onnxruntime can load ({str(error)[:200]})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or list(inputs[0].shape)[1:] != [1, 28, 28] or list(outputs[0].shape)[1:] != [10]:
        raise UserError(
            f"{model_file} does not take N x 1 x 28 x 28 images to 10 classes; export it with fmnist export"
        )
    description_file = model_file.with_suffix(".json")
    try:
        description = json.loads(description_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no description beside it, or not one of ours: the model still serves
        description = {}
    return {
        "model_file": str(model_file),
        "format": "onnx",
        "checkpoint": description.get("checkpoint"),
        "test_accuracy": description.get("test_accuracy"),
        "temperature": description.get("temperature"),
        "input_dtype": inputs[0].type,
        "class_names": list(CLASS_NAMES),
        "package_version": package_version(),
    }


def limits_info(max_body_bytes: int, max_images: int) -> dict[str, int]:
    return {"max_body_bytes": max_body_bytes, "max_images_per_request": max_images, "max_pixels_per_image": MAX_PIXELS}
