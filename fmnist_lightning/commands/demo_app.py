"""The demo's Gradio page: the Try-it tab (predict's own image preparation), the Mistakes tab (the test set's
confusion matrix and its cells' images) and the Runs tab (`fmnist plot`'s curves)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.described import LoadedCheckpoint
from fmnist_lightning.data.batches import in_batches
from fmnist_lightning.data.decode import Invert, prepare_image
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.metrics_log import METRICS_FILE, RunMetrics, read_run, run_name

GALLERY_SIZE = 48  # images shown for one confusion-matrix cell, most confident first


ENLARGE = 10  # the 28x28 input is shown 280x280, pixels kept sharp


@torch.no_grad()
def probabilities_of(model: FashionMNISTClassifier, images: torch.Tensor) -> torch.Tensor:
    """float32 probabilities for N x 1 x 28 x 28 uint8 images."""
    return in_batches(model.probabilities, images)


def classify(
    model: FashionMNISTClassifier, path: str | None, invert: str = "auto"
) -> tuple[np.ndarray | None, str, dict[str, float] | None]:
    """The "Try it" tab: the image the model receives (enlarged), what was done to it, and the probabilities.

    Uses `predict`'s own preparation (`decode.prepare_image`), so both give the same probabilities.
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


def run_choices(runs_dir: Path) -> dict[str, Path]:
    """`name/version_N` -> metrics.csv for every run under `runs_dir`, newest first."""
    files = sorted(runs_dir.glob(f"**/{METRICS_FILE}"), key=lambda path: path.stat().st_mtime, reverse=True)
    return {run_name(path): path for path in files}


def run_curves(runs_dir: Path, names: list[str]) -> tuple[Any, Any, str]:
    """The "Runs" tab: accuracy and loss figures of the chosen runs (`fmnist plot`'s drawing), and a note."""
    from fmnist_lightning.reports.plots import curve_figure

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
