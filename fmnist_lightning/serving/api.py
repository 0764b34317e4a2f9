"""The model behind `fmnist serve`, as a LitServe API: uploads are decoded by `predict`'s own preparation
(`data.decode`), scored in dynamic batches, and answered one JSON per request.

A bad image never fails its batch: decoding never raises, a refused image carries its reason and status to its
own answer. A checkpoint is scored by the LightningModule's `probabilities` (its temperature included, float32);
an exported .onnx file by onnxruntime, with no torch in the serving process.
"""

import io
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from starlette.responses import JSONResponse, Response

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.data.decode import Invert, TooManyPixels, load_image
from fmnist_lightning.serving.metrics import server_metrics

FILE_FIELD = "file"
MAX_IMAGES_PER_REQUEST = 256
Runner = Callable[[np.ndarray], np.ndarray]  # N x 28 x 28 uint8 images -> N x 10 float32 probabilities


@dataclass
class Image:
    """One uploaded image: its pixels once decoded, or why it was refused (with the HTTP status to answer)."""

    name: str
    pixels: np.ndarray | None = None
    error: str = ""
    status: int = 200
    probabilities: np.ndarray | None = None


@dataclass
class Upload:
    """One request's images, or the reason the request as a whole was refused."""

    images: list[Image] = field(default_factory=list)
    error: str = ""
    status: int = 200


def read_upload(form: Any) -> Upload:
    """The images of a multipart form (field `file`, repeatable; optional field `invert`). Never raises."""
    files = form.getlist(FILE_FIELD)  # a form always: the front desk refused or converted every other body
    if not files:
        fields = ", ".join(repr(name) for name in form) or "none"
        return Upload(
            error=f"no image in the request (form fields: {fields}): send it as multipart field 'file' "
            "(curl -F file=@image.png) or as the raw body with an image content type",
            status=400,
        )
    if len(files) > MAX_IMAGES_PER_REQUEST:
        return Upload(
            error=f"{len(files)} images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}", status=413
        )
    try:
        invert = Invert(form.get("invert", "auto"))
    except ValueError:
        return Upload(error=f"invert must be one of auto, always, never; got {form.get('invert')!r}", status=400)
    return Upload(images=[read_image(upload, index, invert) for index, upload in enumerate(files)])


def read_image(upload: Any, index: int, invert: Invert) -> Image:
    """A form field's image, decoded to 28x28 pixels, or its refusal."""
    if isinstance(upload, str):
        return Image(f"file {index}", error="field 'file' holds text, not a file: send it with -F file=@image.png",
                     status=400)  # fmt: skip
    image = Image(upload.filename or f"file {index}")
    data = upload.file.read()
    if not data:
        image.error, image.status = "the file is empty (0 bytes)", 400
        return image
    try:
        image.pixels = load_image(io.BytesIO(data), invert)
    except TooManyPixels as error:
        image.error, image.status = str(error), 413
    except ValueError as error:
        image.error, image.status = str(error), 400
    return image


def torch_runner(checkpoint: Path, device: str) -> Runner:
    """The checkpoint's model on `device`, float32, in eval mode: `fmnist predict --trainer.precision 32-true`."""
    import torch

    from fmnist_lightning.module import FashionMNISTClassifier

    model = FashionMNISTClassifier.from_checkpoint(checkpoint)[0].to(device)

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model.probabilities(torch.from_numpy(images)[:, None].to(device)).cpu().numpy()

    return run


def onnx_runner(model_file: Path, threads: int) -> Runner:
    """An `fmnist export` file on onnxruntime's CPU provider; its temperature and softmax are inside it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    images_input = session.get_inputs()[0]
    takes_bytes = images_input.type == "tensor(uint8)"

    def run(images: np.ndarray) -> np.ndarray:
        batch = images[:, None] if takes_bytes else images[:, None].astype(np.float32) / 255
        return session.run(None, {images_input.name: batch})[0]

    return run


class ClassifierAPI(ls.LitAPI):
    """What each inference worker runs: decode (in the worker, per request), score (per batch), answer."""

    def __init__(self, model_file: Path, top_k: int, threads: int, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_file, self.top_k, self.threads = model_file, top_k, threads
        self.run: Runner | None = None

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # `fmnist serve` stops its workers itself (see run_until_stopped)
        if self.model_file.suffix == ".onnx":
            self.run = onnx_runner(self.model_file, self.threads)
        else:
            import torch

            torch.set_num_threads(self.threads)
            self.run = torch_runner(self.model_file, device)
        server_metrics()

    def decode_request(self, request) -> Upload:  # no annotation: LitServe would read it as the body type
        """`request`: the multipart form LitServe parsed from the body (the front desk made it one)."""
        upload = read_upload(request)
        for image in upload.images:
            server_metrics().images.labels("decoded" if image.pixels is not None else "refused").inc()
        return upload

    def predict(self, x: Upload | list[Upload]) -> Upload | list[Upload]:
        """Scores every decoded image of the batch (of one request when batching is off) in one forward pass."""
        uploads = x if isinstance(x, list) else [x]
        images = [image for upload in uploads for image in upload.images if image.pixels is not None]
        if images:
            probabilities = self.run(np.stack([image.pixels for image in images]))
            for image, row in zip(images, probabilities, strict=True):
                image.probabilities = row
            server_metrics().batch_size.observe(len(images))
        return x

    def encode_response(self, output: Upload) -> Response:
        return answer(output, self.top_k)


def answer(upload: Upload, top_k: int) -> JSONResponse:
    """One image: its prediction, or its refusal with its status. Several: 200 with one entry per image."""
    if upload.error:
        return JSONResponse({"error": upload.error}, status_code=upload.status)
    entries = [image_answer(image, top_k) for image in upload.images]
    if len(entries) > 1:
        return JSONResponse({"predictions": entries})
    return JSONResponse(entries[0], status_code=upload.images[0].status)


def image_answer(image: Image, top_k: int) -> dict[str, Any]:
    if image.probabilities is None:
        return {"file": image.name, "error": image.error}
    ranked = np.argsort(-image.probabilities, kind="stable")[:top_k]
    top = [
        {"class": CLASS_NAMES[index], "index": int(index), "probability": float(image.probabilities[index])}
        for index in ranked
    ]
    best = top[0]
    return {
        "file": image.name,
        "predicted_class": best["class"],
        "predicted_index": best["index"],
        "probability": best["probability"],
        "top_k": top,
    }


def default_threads(workers: int) -> int:
    """The cores but one (the HTTP server's) shared out among the inference workers, at least one thread each:
    on 2 cores, 1 thread served 40% more requests/s at concurrency 8 than 2 (docs/serving.md)."""
    return max(1, ((os.cpu_count() or 1) - 1) // workers)
