"""`fmnist demo`: a local Gradio app to try a checkpoint on pictures, explore its test-set mistakes and compare
runs. Offline by design: no telemetry, no share links, no fonts or scripts fetched from the internet."""

import errno
import inspect
import ipaddress
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.checkpoints import model_from_checkpoint
from fmnist_lightning.data import load_split
from fmnist_lightning.dataset_files import SYSTEM_DATA_DIR, ensure_dataset
from fmnist_lightning.errors import UserError
from fmnist_lightning.images import Invert, prepare_image
from fmnist_lightning.metrics_log import METRICS_FILE, RunMetrics, read_run, run_name
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.run_folders import find_run_checkpoint

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
GALLERY_SIZE = 48  # images shown for one confusion-matrix cell, most confident first
ENLARGE = 10  # the 28x28 input is shown 280x280, pixels kept sharp
IMPROVED_SETTINGS = ("batch_norm", "dropout", "label_smoothing", "lr_schedule", "normalize")


@dataclass
class LoadedCheckpoint:
    """The model and what the page says about it."""

    model: FashionMNISTClassifier
    path: Path
    recipe: str
    test_accuracy: float | None
    data_dir: str
    system_dir: str


def resolve_checkpoint(ckpt_path: str, runs_dir: Path) -> Path:
    """`last`/`best`: that checkpoint of the newest run under `runs_dir` (any run name); else the path itself."""
    if ckpt_path not in ("last", "best"):
        return Path(ckpt_path)
    lasts = sorted(runs_dir.glob("*/version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not lasts:
        raise UserError(f"--ckpt_path {ckpt_path}: no run with a checkpoint under {runs_dir}; train first")
    return find_run_checkpoint(lasts[-1].parents[2], ckpt_path)


def load_for_demo(path: Path) -> LoadedCheckpoint:
    """The model in eval mode (float32, CPU) with its recipe and, when its run tested it, its test accuracy."""
    model, checkpoint = model_from_checkpoint(path)
    settings = checkpoint.get("hyper_parameters") or {}
    defaults = {name: p.default for name, p in inspect.signature(FashionMNISTClassifier).parameters.items()}
    changed = [name for name in IMPROVED_SETTINGS if name in settings and settings[name] != defaults.get(name)]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if any(data.get(name) for name in ("translate", "flip", "erase", "rotate", "zoom")):
        changed.append("augmentation")
    optimizer = (settings.get("optimizer") or {}).get("class_path", "torch.optim.Adam").rsplit(".", 1)[-1]
    recipe = f"{settings.get('architecture', 'original')} network, {optimizer}"
    recipe += f", improved recipe ({', '.join(changed)})" if changed else ", the original recipe"
    if model.temperature != 1:
        recipe += f", calibrated (temperature {model.temperature:.3f})"
    return LoadedCheckpoint(
        model=model,
        path=path,
        recipe=recipe,
        test_accuracy=_tested_accuracy(path),
        data_dir=str(data.get("data_dir", "data")),
        system_dir=str(data.get("system_dir", SYSTEM_DATA_DIR)),
    )


def _tested_accuracy(checkpoint_path: Path) -> float | None:
    """The test accuracy in the checkpoint's run's metrics.csv, if that run was tested."""
    metrics_file = checkpoint_path.parent.parent / METRICS_FILE
    try:
        return read_run(metrics_file).final.get("test_acc") if metrics_file.is_file() else None
    except UserError:
        return None


@torch.no_grad()
def probabilities_of(model: FashionMNISTClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """float32 probabilities for N x 1 x 28 x 28 uint8 images."""
    return torch.cat([model.probabilities(images[start : start + batch]) for start in range(0, len(images), batch)])


def classify(
    model: FashionMNISTClassifier, path: str | None, invert: str = "auto"
) -> tuple[np.ndarray | None, str, dict[str, float] | None]:
    """The "Try it" tab: the image the model receives (enlarged), what was done to it, and the probabilities.

    Uses `predict`'s own preparation (`images.prepare_image`), so both give the same probabilities.
    """
    if not path:
        return None, "Upload a picture or draw one.", None
    try:
        pixels, inverted = prepare_image(path, Invert(invert))
    except ValueError as error:
        return None, f"Cannot use this file: {str(error).rstrip('.')}.", None
    probabilities = probabilities_of(model, torch.from_numpy(pixels)[None, None])[0]
    if invert == "auto":
        how = "inverted: its border was light" if inverted else "not inverted: its border was already dark"
    else:
        how = "inverted (--invert always)" if inverted else "not inverted (never)"
    note = f"The model sees this 28x28 grayscale image ({how}; longest side shrunk to 28, padded with black)."
    shown = np.kron(pixels, np.ones((ENLARGE, ENLARGE), dtype=np.uint8))
    return shown, note, {name: float(p) for name, p in zip(CLASS_NAMES, probabilities.tolist(), strict=True)}


@dataclass
class ScoredTestSet:
    """The model's probabilities on the official test set, for the "Mistakes" tab."""

    images: torch.Tensor
    labels: torch.Tensor
    probabilities: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    def confusion(self) -> torch.Tensor:
        """Counts: rows are true classes, columns predicted ones."""
        return multiclass_confusion_matrix(self.predicted, self.labels, len(CLASS_NAMES))

    def confusion_rows(self) -> list[list[Any]]:
        """One row per true class: its name, then the count predicted as each class."""
        return [[name, *row] for name, row in zip(CLASS_NAMES, self.confusion().tolist(), strict=True)]

    def most_confused(self) -> tuple[str, str]:
        """The (true, predicted) class pair of the most frequent mistake: the cell the tab opens on."""
        counts = self.confusion().fill_diagonal_(-1)
        true_index, predicted_index = divmod(int(counts.argmax()), len(CLASS_NAMES))
        return CLASS_NAMES[true_index], CLASS_NAMES[predicted_index]

    def cell(self, true_class: str, predicted_class: str) -> tuple[list[tuple[np.ndarray, str]], str]:
        """The test images of one confusion-matrix cell, most confident first, with captions; and a summary."""
        true_index, predicted_index = CLASS_NAMES.index(true_class), CLASS_NAMES.index(predicted_class)
        chosen = ((self.labels == true_index) & (self.predicted == predicted_index)).nonzero().squeeze(1)
        confidence = self.probabilities[chosen, predicted_index]
        order = chosen[confidence.argsort(descending=True)][:GALLERY_SIZE]
        items = [
            (self.images[index, 0].numpy(), f"#{index}: {float(self.probabilities[index, predicted_index]):.2%}")
            for index in order.tolist()
        ]
        what = "right" if true_index == predicted_index else "wrong"
        summary = (
            f"{len(chosen):,} test images of class {true_class} predicted as {predicted_class} ({what}); "
            f"showing {len(items)}, most confident first."
        )
        return items, summary


def predict_test_set(loaded: LoadedCheckpoint, data_dir: str | None = None) -> ScoredTestSet:
    """Score the official test set once at start-up; never downloads (the demo works offline)."""
    folder = data_dir or loaded.data_dir
    ensure_dataset(folder, Path(loaded.system_dir), download=False)
    test = load_split(folder, train=False)
    return ScoredTestSet(test.images, test.labels, probabilities_of(loaded.model, test.images))


def run_choices(runs_dir: Path) -> dict[str, Path]:
    """`name/version_N` -> metrics.csv for every run under `runs_dir`, newest first."""
    files = sorted(runs_dir.glob(f"**/{METRICS_FILE}"), key=lambda path: path.stat().st_mtime, reverse=True)
    return {run_name(path): path for path in files}


def run_curves(runs_dir: Path, names: list[str]) -> tuple[Any, Any, str]:
    """The "Runs" tab: accuracy and loss figures of the chosen runs (`fmnist plot`'s drawing), and a note."""
    from fmnist_lightning.plots import curve_figure

    choices = run_choices(runs_dir)
    runs: list[RunMetrics] = []
    skipped = []
    for name in names or []:
        try:
            runs.append(read_run(choices[name]))
        except (KeyError, UserError) as error:
            skipped.append(f"{name} ({error})")
    if not runs:
        return None, None, "Choose one or more runs with per-epoch metrics." + _skipped_note(skipped)
    return curve_figure(runs, "acc"), curve_figure(runs, "loss"), _skipped_note(skipped)


def _skipped_note(skipped: list[str]) -> str:
    return f" Not drawn: {'; '.join(skipped)}." if skipped else ""


# A host name: dot-separated labels of letters, digits and inner hyphens (RFC 1123).
HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*")


def host_family(host: str) -> socket.AddressFamily:
    """The address family to serve `host` on; a value that is no IP address or host name is refused."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass
    numeric = all(label.isdigit() for label in host.split("."))  # 999.1.2.3 is a bad address, not a name
    if not HOST_NAME.fullmatch(host) or numeric:
        raise UserError(
            f"--host {host!r} is not an address to serve on; give an IP address such as 127.0.0.1 (this machine "
            "only) or 0.0.0.0 (every network), or a host name"
        )
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: {error.strerror}; give an IP address such as 127.0.0.1") from None


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a host that is no address of this machine, or a port already in use, before anything starts."""
    with socket.socket(host_family(host)) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                hint = f"--host {host} is not an address of this machine; give 127.0.0.1 or 0.0.0.0"
            elif error.errno == errno.EACCES:
                hint = "ports below 1024 need root; choose another --port"
            else:
                hint = "choose another --port"
            raise UserError(f"cannot serve on {host}:{port}: {error.strerror}; {hint}") from None


@contextmanager
def offline_gradio() -> Iterator[Path]:
    """Gradio without telemetry or version checks, its uploads in a temporary folder removed afterwards."""
    temporary = Path(tempfile.mkdtemp(prefix="fmnist-demo-"))
    saved = {name: os.environ.get(name) for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR")}
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(temporary))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def header(loaded: LoadedCheckpoint) -> str:
    accuracy = f"{loaded.test_accuracy:.4f}" if loaded.test_accuracy is not None else "not tested in its run"
    return (
        f"# Fashion-MNIST classifier\n**Checkpoint:** `{loaded.path}`  \n**Recipe:** {loaded.recipe}  \n"
        f"**Test accuracy:** {accuracy}"
    )


def build_app(loaded: LoadedCheckpoint, test_set: ScoredTestSet | str, runs_dir: Path, top_k: int = 3) -> Any:
    """The Gradio Blocks app; `test_set` is the predictions, or why there are none."""
    import gradio as gr

    with gr.Blocks(title="fmnist demo", analytics_enabled=False) as app:
        gr.Markdown(header(loaded))
        with gr.Tab("Try it"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Upload a picture (any format Pillow reads)", type="filepath")
                    sketch = gr.Sketchpad(label="...or draw one", type="filepath", canvas_size=(280, 280))
                    invert = gr.Radio(["auto", "always", "never"], value="auto", label="Invert to light-on-dark")
                with gr.Column():
                    seen = gr.Image(label="What the model sees (28x28)", format="png", interactive=False, height=300)
                    note = gr.Markdown(elem_id="what-was-done")
                    answer = gr.Label(label="Prediction", num_top_classes=top_k, elem_id="prediction")

            def from_upload(path: str | None, how: str) -> tuple[Any, str, Any]:
                return classify(loaded.model, path, how)

            def from_sketch(value: dict[str, Any] | None, how: str) -> tuple[Any, str, Any]:
                return classify(loaded.model, (value or {}).get("composite"), how)

            upload.change(from_upload, [upload, invert], [seen, note, answer])
            sketch.change(from_sketch, [sketch, invert], [seen, note, answer])
            invert.change(from_upload, [upload, invert], [seen, note, answer])
        with gr.Tab("Mistakes"):
            if isinstance(test_set, str):
                gr.Markdown(f"The test set is not available: {test_set}")
            else:
                gr.Markdown(
                    f"Confusion matrix on the {len(test_set.labels):,} test images (rows: true class, columns: "
                    "predicted). Click a cell, or choose the classes below; it opens on the most frequent mistake."
                )
                matrix = gr.Dataframe(
                    test_set.confusion_rows(), headers=["true \\ predicted", *CLASS_NAMES], interactive=False
                )
                with gr.Row():
                    first_true, first_predicted = test_set.most_confused()
                    true_class = gr.Dropdown(list(CLASS_NAMES), value=first_true, label="true class")
                    predicted_class = gr.Dropdown(list(CLASS_NAMES), value=first_predicted, label="predicted class")
                cell_note = gr.Markdown()
                gallery = gr.Gallery(label="Test images of the cell", columns=8, height="auto", object_fit="contain")

                def choose_cell(event: gr.SelectData) -> tuple[Any, Any]:
                    row, column = event.index
                    if column == 0:
                        return gr.update(value=CLASS_NAMES[row]), gr.update()
                    return gr.update(value=CLASS_NAMES[row]), gr.update(value=CLASS_NAMES[column - 1])

                def show_cell(true_name: str, predicted_name: str) -> tuple[Any, str]:
                    return test_set.cell(true_name, predicted_name)

                matrix.select(choose_cell, None, [true_class, predicted_class])
                for dropdown in (true_class, predicted_class):
                    dropdown.change(show_cell, [true_class, predicted_class], [gallery, cell_note])
                app.load(show_cell, [true_class, predicted_class], [gallery, cell_note])
        with gr.Tab("Runs"):
            names = list(run_choices(runs_dir))
            chosen = gr.Dropdown(names, value=names[:1], multiselect=True, label=f"runs under {runs_dir}/")
            runs_note = gr.Markdown()
            with gr.Row():
                accuracy_plot = gr.Plot(label="accuracy", format="png")
                loss_plot = gr.Plot(label="loss", format="png")

            def show_runs(selected: list[str]) -> tuple[Any, Any, str]:
                return run_curves(runs_dir, selected)

            chosen.change(show_runs, chosen, [accuracy_plot, loss_plot, runs_note])
            app.load(show_runs, chosen, [accuracy_plot, loss_plot, runs_note])
    return app


def serve(app: Any, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the server and return (the command exits 0)."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        app.launch(server_name=host, server_port=port, share=False, quiet=True, prevent_thread_lock=True,
                   ssr_mode=False, max_file_size="256mb", footer_links=[])  # fmt: skip
        print(f"demo:             http://{host}:{port} (Ctrl-C to stop)", flush=True)
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        signal.signal(signal.SIGTERM, previous)
