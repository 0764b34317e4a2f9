"""The demo's Gradio page: the Try-it tab (predict's own image preparation), the Mistakes tab (the test set's
confusion matrix and its cells' images), both with where the model looks (`fmnist explain`'s Grad-CAM), and the
Runs tab (`fmnist plot`'s curves)."""

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
from fmnist_lightning.reports.attributions import attribution_maps, default_layer
from fmnist_lightning.reports.metrics_log import METRICS_FILE, RunMetrics, read_run, run_name

GALLERY_SIZE = 48  # images shown for one confusion-matrix cell, most confident first


ENLARGE = 10  # the 28x28 input is shown 280x280, pixels kept sharp
PICTURE = {"format": "png", "interactive": False, "height": 300}  # the 280x280 pictures' settings
CLICK_AN_IMAGE = "Click an image to see where the model looks."


@torch.no_grad()
def probabilities_of(model: FashionMNISTClassifier, images: torch.Tensor) -> torch.Tensor:
    """float32 probabilities for N x 1 x 28 x 28 uint8 images."""
    return in_batches(model.probabilities, images)


def enlarged(pixels: np.ndarray) -> np.ndarray:
    """A 28x28 (x 3) picture ENLARGE times larger, each pixel a sharp square."""
    return pixels.repeat(ENLARGE, axis=0).repeat(ENLARGE, axis=1)


def gradcam_overlay(model: FashionMNISTClassifier, pixels: np.ndarray, target: int) -> np.ndarray:
    """Where the model finds evidence for class `target` in a 28x28 uint8 picture: `fmnist explain`'s Grad-CAM
    (its default layer) over the picture, enlarged like it."""
    from fmnist_lightning.reports.explanation_plots import overlay_rgb  # matplotlib only when drawing

    maps = attribution_maps(model, torch.from_numpy(pixels)[None, None], "gradcam", torch.tensor([target]))
    return enlarged(overlay_rgb(pixels, maps[0].numpy()))


def classify(
    model: FashionMNISTClassifier, path: str | None, invert: str = "auto"
) -> tuple[np.ndarray | None, np.ndarray | None, str, dict[str, float] | None]:
    """The "Try it" tab: the image the model receives (enlarged), where it looks for its top class (Grad-CAM),
    what was done to the image, and the probabilities.

    Uses `predict`'s own preparation (`decode.prepare_image`), so both give the same probabilities.
    """
    if not path:
        return None, None, "Upload a picture or draw one.", None
    try:
        pixels, inverted = prepare_image(path, Invert(invert))
    except ValueError as error:
        return None, None, f"Cannot use this file: {str(error).rstrip('.')}.", None
    probabilities = probabilities_of(model, torch.from_numpy(pixels)[None, None])[0]
    if invert == "auto":
        how = "inverted: its border was light" if inverted else "not inverted: its border was already dark"
    else:
        how = "inverted (--invert always)" if inverted else "not inverted (never)"
    note = f"The model sees this 28x28 grayscale image ({how}; longest side shrunk to 28, padded with black)."
    overlay = gradcam_overlay(model, pixels, int(probabilities.argmax()))
    scores = {name: float(p) for name, p in zip(CLASS_NAMES, probabilities.tolist(), strict=True)}
    return enlarged(pixels), overlay, note, scores


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

    def cell_indices(self, true_class: str, predicted_class: str) -> torch.Tensor:
        """The test indices of one confusion-matrix cell, most confident first."""
        true_index, predicted_index = CLASS_NAMES.index(true_class), CLASS_NAMES.index(predicted_class)
        chosen = ((self.labels == true_index) & (self.predicted == predicted_index)).nonzero().squeeze(1)
        return chosen[self.probabilities[chosen, predicted_index].argsort(descending=True)]

    def cell(self, true_class: str, predicted_class: str) -> tuple[list[tuple[np.ndarray, str]], str]:
        """The test images of one confusion-matrix cell, most confident first, with captions; and a summary."""
        chosen = self.cell_indices(true_class, predicted_class)
        predicted_index = CLASS_NAMES.index(predicted_class)
        items = [
            (self.images[index, 0].numpy(), f"#{index}: {float(self.probabilities[index, predicted_index]):.2%}")
            for index in chosen[:GALLERY_SIZE].tolist()
        ]
        what = "right" if true_class == predicted_class else "wrong"
        summary = (
            f"{len(chosen):,} test images of class {true_class} predicted as {predicted_class} ({what}); "
            f"showing {len(items)}, most confident first."
        )
        return items, summary

    def explained(
        self, model: FashionMNISTClassifier, true_class: str, predicted_class: str, position: int
    ) -> tuple[np.ndarray, str]:
        """The Grad-CAM overlay of the `position`-th image shown for a cell, and a caption saying what it is."""
        index = int(self.cell_indices(true_class, predicted_class)[position])
        predicted = int(self.predicted[index])
        caption = (
            f"Test image #{index}: a {CLASS_NAMES[self.labels[index]]} predicted as {CLASS_NAMES[predicted]} "
            f"({float(self.probabilities[index, predicted]):.2%}). Grad-CAM of {default_layer(model)} for the "
            "predicted class: the warm colours are where the model found its evidence."
        )
        return gradcam_overlay(model, self.images[index, 0].numpy(), predicted), caption


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

    layer = default_layer(loaded.model)
    with gr.Blocks(title="fmnist demo", analytics_enabled=False) as app:
        gr.Markdown(header(loaded))
        with gr.Tab("Try it"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Upload a picture (any format Pillow reads)", type="filepath")
                    sketch = gr.Sketchpad(label="...or draw one", type="filepath", canvas_size=(280, 280))
                    invert = gr.Radio(["auto", "always", "never"], value="auto", label="Invert to light-on-dark")
                with gr.Column():
                    with gr.Row():
                        seen = gr.Image(label="What the model sees (28x28)", **PICTURE)
                        looks = gr.Image(label=f"Grad-CAM of {layer}", elem_id="gradcam", **PICTURE)
                    note = gr.Markdown(elem_id="what-was-done")
                    answer = gr.Label(label="Prediction", num_top_classes=top_k, elem_id="prediction")

            def from_upload(path: str | None, how: str) -> tuple[Any, Any, str, Any]:
                return classify(loaded.model, path, how)

            def from_sketch(value: dict[str, Any] | None, how: str) -> tuple[Any, Any, str, Any]:
                return classify(loaded.model, (value or {}).get("composite"), how)

            shown = [seen, looks, note, answer]
            upload.change(from_upload, [upload, invert], shown)
            sketch.change(from_sketch, [sketch, invert], shown)
            invert.change(from_upload, [upload, invert], shown)
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
                with gr.Row():
                    gallery = gr.Gallery(label="Test images of the cell", columns=6, height="auto",
                                         object_fit="contain", scale=3)  # fmt: skip
                    with gr.Column(scale=1, min_width=300):
                        mistake_looks = gr.Image(label=f"Grad-CAM of {layer}", elem_id="mistake-gradcam", **PICTURE)
                        mistake_note = gr.Markdown(CLICK_AN_IMAGE, elem_id="mistake-gradcam-note")

                def choose_cell(event: gr.SelectData) -> tuple[Any, Any]:
                    row, column = event.index
                    if column == 0:
                        return gr.update(value=CLASS_NAMES[row]), gr.update()
                    return gr.update(value=CLASS_NAMES[row]), gr.update(value=CLASS_NAMES[column - 1])

                def show_cell(true_name: str, predicted_name: str) -> tuple[Any, str, None, str]:
                    return *test_set.cell(true_name, predicted_name), None, CLICK_AN_IMAGE

                def explain_image(true_name: str, predicted_name: str, event: gr.SelectData) -> tuple[Any, str]:
                    return test_set.explained(loaded.model, true_name, predicted_name, event.index)

                matrix.select(choose_cell, None, [true_class, predicted_class])
                cell_outputs = [gallery, cell_note, mistake_looks, mistake_note]
                for dropdown in (true_class, predicted_class):
                    dropdown.change(show_cell, [true_class, predicted_class], cell_outputs)
                app.load(show_cell, [true_class, predicted_class], cell_outputs)
                gallery.select(explain_image, [true_class, predicted_class], [mistake_looks, mistake_note])
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
