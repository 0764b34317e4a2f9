"""`fmnist explain --ckpt_path CKPT`: what the model looks at. Attribution maps from Captum (Grad-CAM, Integrated
Gradients or Occlusion) of the test set's most confident mistakes or of your pictures, drawn over them, and how
faithful the maps are (deletion curve, model randomisation) on the test set. Every input is checked before
anything is written; the folder appears complete, or not at all."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentParser

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.described import describe_checkpoint, resolve_checkpoint
from fmnist_lightning.data.batches import in_batches
from fmnist_lightning.data.datamodule import official_test_set
from fmnist_lightning.data.decode import Invert, load_image
from fmnist_lightning.data.images import iter_image_paths
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_folder, atomic_write, ensure_output_path
from fmnist_lightning.reports.attributions import Method, attribution_maps, checked_layer
from fmnist_lightning.reports.faithfulness import Faithfulness, measure_faithfulness
from fmnist_lightning.training.run_folders import checkpoint_run_folder

MAX_COUNT = 100  # pictures per run: the overview sheet stays readable
SHEET = "explanations.png"
REPORT = "faithfulness.json"
CURVE = "deletion_curve.png"
TOP_CLASSES = 3


def explain_command(args: list[str]) -> None:
    """`fmnist explain --ckpt_path CKPT`: attribution maps of mistakes or pictures, and their faithfulness."""
    parser = ArgumentParser(prog="fmnist explain", description=explain_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint (.ckpt), or last/best of the newest run")
    parser.add_argument("--runs_dir", default="runs", help="folder of runs where last/best look")
    parser.add_argument("--method", type=Method, default="gradcam",
                        help="gradcam (Grad-CAM on --layer), ig (Integrated Gradients) or occlusion")  # fmt: skip
    parser.add_argument("--layer", help="Grad-CAM's layer (default: the last convolution with a map of 10x10 or more)")
    parser.add_argument("--count", type=int, default=12, help=f"images explained, 1 to {MAX_COUNT}")
    parser.add_argument("--faithfulness_images", type=int, default=1000, help="test images checked; 0 skips it")
    parser.add_argument("--output", help="folder to write (default: RUN/explanations/METHOD beside the checkpoint)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace a folder an earlier explain wrote")
    parser.add_argument("--data.predict_paths", type=list[str] | None, default=None,
                        help="image files, folders or globs to explain (default: the test set's mistakes)")  # fmt: skip
    parser.add_argument("--data.invert", type=Literal["auto", "always", "never"], default="auto",
                        help="light on dark: auto (invert when the border is light), always, never")  # fmt: skip
    parser.add_argument("--data.data_dir", help="Fashion-MNIST folder (default: the checkpoint's run's)")
    parser.add_argument("--data.system_dir", help="the system's copy of the files (default: the run's)")
    config = parser.parse_args(args)
    data = config.data
    result = explain(
        config.ckpt_path, config.method, config.layer, config.count, config.faithfulness_images, config.output,
        config.overwrite, Path(config.runs_dir), data.predict_paths, data.invert, data.data_dir, data.system_dir,
    )  # fmt: skip
    print(f"explanations:     {result.folder} ({result.images} pictures of {result.what}, and {SHEET})")
    report = result.faithfulness
    if report is None:
        print("faithfulness:     not checked (--faithfulness_images 0)")
        return
    print(f"faithfulness:     {result.folder / REPORT}, {result.folder / CURVE} ({report.images:,} test images)")
    print(
        f"deletion AUC:     {report.deletion_auc:.3f} in the attribution's order, {report.random_auc:.3f} in a random "
        f"order (difference {report.auc_difference:+.3f}, ratio {report.auc_ratio:.2f}; lower is more faithful)"
    )
    verdict = "passed" if report.randomisation_passed else "FAILED"
    print(
        f"randomisation:    {verdict}: Spearman {report.randomisation_spearman:.3f} between the trained and a "
        f"re-initialised network's maps (passes below {report.randomisation_threshold})"
    )


@dataclass
class Chosen:
    """The images to explain: N x 1 x 28 x 28 uint8, a name for each, and their labels (-1: unknown)."""

    pixels: torch.Tensor
    names: list[str]
    labels: torch.Tensor


@dataclass
class ExplainResult:
    folder: Path
    images: int
    what: str
    faithfulness: Faithfulness | None


def explain(
    ckpt_path: str,
    method: Method = "gradcam",
    layer: str | None = None,
    count: int = 12,
    faithfulness_images: int = 1000,
    output: str | None = None,
    overwrite: bool = False,
    runs_dir: Path = Path("runs"),
    predict_paths: list[str] | None = None,
    invert: str = "auto",
    data_dir: str | None = None,
    system_dir: str | None = None,
) -> ExplainResult:
    """Check every input, compute the maps and the checks, then write the folder whole."""
    if layer is not None and method != "gradcam":
        raise UserError(f"--layer is Grad-CAM's; --method {method} reads no layer, leave --layer out")
    if not 1 <= count <= MAX_COUNT:
        raise UserError(f"--count must be between 1 and {MAX_COUNT}, got {count}")
    if faithfulness_images < 0:
        raise UserError(f"--faithfulness_images must be 0 (skip the checks) or more, got {faithfulness_images}")
    if predict_paths is not None and not predict_paths:
        raise UserError("--data.predict_paths is an empty list; give image files, folders or globs, or leave it out")
    loaded = describe_checkpoint(resolve_checkpoint(ckpt_path, runs_dir))
    model = loaded.model
    layer = checked_layer(model, layer) if method == "gradcam" else None
    destination = Path(output) if output else checkpoint_run_folder(loaded.path) / "explanations" / method
    check_destination(destination, overwrite)
    test = None
    if predict_paths is None or faithfulness_images:
        test = official_test_set(data_dir or loaded.data_dir, system_dir or loaded.system_dir)
    if predict_paths is None:
        chosen, what = most_confident_mistakes(model, test.images, test.labels, count)
    else:
        chosen, what = pictures(predict_paths, Invert(invert), count)

    with torch.no_grad():
        probabilities = in_batches(model.probabilities, chosen.pixels)
    maps = attribution_maps(model, chosen.pixels, method, probabilities.argmax(dim=1), layer)
    report = None
    if faithfulness_images:
        images = test.images[:faithfulness_images]
        with torch.no_grad():
            predicted = in_batches(model.probabilities, images).argmax(dim=1)
        report = measure_faithfulness(model, images, predicted, method, layer)
    with atomic_folder(destination) as folder:
        write_pictures(folder, chosen, probabilities, maps, method, layer, report)
        if report is not None:
            with atomic_write(folder / REPORT, "w", encoding="utf-8") as file:
                json.dump({"checkpoint": str(loaded.path), **report.as_json()}, file, indent=2)
                file.write("\n")
    return ExplainResult(destination, len(chosen.names), what, report)


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists, unless asked, and then only one an earlier explain wrote."""
    ensure_output_path(destination, "--output", is_folder=True)
    if not destination.exists():
        return
    if not overwrite:
        raise UserError(f"{destination} exists; give another --output, or --overwrite true to replace it")
    if not (destination / SHEET).is_file():
        raise UserError(f"{destination} holds no {SHEET}, so fmnist explain did not write it; choose another --output")


def most_confident_mistakes(
    model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, count: int
) -> tuple[Chosen, str]:
    """The `count` test images the model gets wrong with the highest probability."""
    with torch.no_grad():
        confidence, predicted = in_batches(model.probabilities, images).max(dim=1)
    wrong = (predicted != labels).nonzero().squeeze(1)
    if not len(wrong):
        raise UserError(
            f"the model gets all {len(labels):,} test images right; give pictures with --data.predict_paths"
        )
    index = wrong[confidence[wrong].argsort(descending=True)[:count]]
    names = [f"test #{position}" for position in index.tolist()]
    return Chosen(images[index], names, labels[index]), f"the test set's {len(index)} most confident mistakes"


def pictures(sources: list[str], invert: Invert, count: int) -> tuple[Chosen, str]:
    """The first `count` image files `sources` name, prepared as `predict` prepares them; a file that is not a
    readable image is refused (nothing is written)."""
    pixels, names = [], []
    for path, problem in iter_image_paths(sources):
        if len(names) == count:
            break
        if problem is None:
            try:
                pixels.append(torch.from_numpy(load_image(path, invert)))
                names.append(path)
                continue
            except ValueError as error:
                problem = str(error)
        raise UserError(f"--data.predict_paths: {path}: {problem}")
    labels = torch.full((len(names),), -1, dtype=torch.int64)
    return Chosen(torch.stack(pixels)[:, None], names, labels), f"the first {len(names)} files given"


def write_pictures(
    folder: Path,
    chosen: Chosen,
    probabilities: torch.Tensor,
    maps: torch.Tensor,
    method: str,
    layer: str | None,
    report: Faithfulness | None,
) -> None:
    """A picture per image, the overview sheet and, when checked, the deletion curves."""
    from fmnist_lightning.reports.explanation_plots import (  # matplotlib only when drawing
        METHOD_NAMES,
        deletion_curve_figure,
        explanation_figure,
        explanation_sheet_figure,
    )
    from fmnist_lightning.reports.plots import save_figure

    label = METHOD_NAMES[method] + (f" of {layer}" if layer else "")
    pixels = [image[0].numpy() for image in chosen.pixels]
    heatmaps = [heatmap.numpy() for heatmap in maps]
    captions, correct = [], []
    for position, name in enumerate(chosen.names):
        top = probabilities[position].topk(TOP_CLASSES)
        classes = [(CLASS_NAMES[index], float(value)) for value, index in zip(*top, strict=True)]
        truth = CLASS_NAMES[chosen.labels[position]] if chosen.labels[position] >= 0 else None
        title = f"{name}: predicted {classes[0][0]} ({classes[0][1]:.1%})"
        figure = explanation_figure(pixels[position], heatmaps[position], classes, title, label, truth)
        save_figure(figure, folder / f"{position + 1:02d}-{file_stem(name)}.png")
        caption = f"{Path(name).name}: {classes[0][0]} {classes[0][1]:.0%}"
        captions.append(caption + (f"\ntrue: {truth}" if truth else ""))
        correct.append(None if truth is None else truth == classes[0][0])
    sheet = explanation_sheet_figure(pixels, heatmaps, captions, correct, f"{label}: where the model looks")
    save_figure(sheet, folder / SHEET)
    if report is not None:
        save_figure(deletion_curve_figure(report), folder / CURVE)


def file_stem(name: str) -> str:
    """A file name from an image's name: `test #12` -> `test-12`, a path -> its stem, safe characters only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem if "#" not in name else name).strip("-") or "image"
