"""Whether the model's probabilities mean what they say (ECE, MCE, NLL, Brier score, reliability bins), and
`fmnist calibrate`: one temperature fitted on the validation split, saved in a new checkpoint."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassCalibrationError

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.batches import TensorBatchDataset
from fmnist_lightning.checkpoints import model_from_checkpoint
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.outputs import atomic_write, ensure_output_path

CALIBRATION_BINS = 15  # equal-width top-1 confidence bins, the usual choice for ECE
# The data settings that decide which images are the checkpoint's validation split, and where they are.
SPLIT_DATA_SETTINGS = ("data_dir", "system_dir", "download", "val_size", "split_seed")
INFERENCE_BATCH = 1000


class ReliabilityBins(Metric):
    """Images, summed top-1 confidence and correct predictions per confidence bin: a reliability diagram's data.

    Bins are torchmetrics' (`MulticlassCalibrationError`): [k/n, (k+1)/n), the last one closed.
    """

    full_state_update = False

    def __init__(self, bins: int = CALIBRATION_BINS) -> None:
        super().__init__()
        self.register_buffer("boundaries", torch.linspace(0, 1, bins + 1), persistent=False)
        for name in ("images", "confidence", "correct"):
            self.add_state(name, torch.zeros(bins), dist_reduce_fx="sum")

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, predicted = probabilities.float().max(dim=1)
        index = (torch.bucketize(confidence, self.boundaries, right=True) - 1).clamp_(0, len(self.images) - 1)
        self.images.index_add_(0, index, torch.ones_like(confidence))
        self.confidence.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, (predicted == labels).float())

    def compute(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "confidence": self.confidence, "correct": self.correct}


@dataclass
class CalibrationSummary:
    """Calibration of a set of predictions; `bins` holds per-bin image counts and summed confidence/correct."""

    ece: float
    mce: float
    nll: float
    brier: float
    accuracy: float
    bins: dict[str, torch.Tensor]

    @property
    def images(self) -> int:
        return int(self.bins["images"].sum())


class CalibrationMetric(nn.Module):
    """ECE and MCE (torchmetrics), NLL, Brier score and the reliability bins, updated from probabilities.

    Each metric synchronises itself across processes under DDP when computed.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), bins: int = CALIBRATION_BINS) -> None:
        super().__init__()
        self.ece = MulticlassCalibrationError(num_classes, n_bins=bins, norm="l1")
        self.mce = MulticlassCalibrationError(num_classes, n_bins=bins, norm="max")
        self.nll = MeanMetric()
        self.brier = MeanMetric()
        self.bins = ReliabilityBins(bins)

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        probabilities = probabilities.float()
        self.ece.update(probabilities, labels)
        self.mce.update(probabilities, labels)
        true_class = probabilities.gather(1, labels[:, None]).squeeze(1)
        self.nll.update(-true_class.clamp_min(torch.finfo(torch.float32).tiny).log())
        one_hot = F.one_hot(labels, probabilities.shape[1]).float()
        self.brier.update((probabilities - one_hot).square().sum(dim=1))
        self.bins.update(probabilities, labels)

    def compute(self) -> CalibrationSummary:
        bins = {name: value.cpu() for name, value in self.bins.compute().items()}
        return CalibrationSummary(
            ece=float(self.ece.compute()),
            mce=float(self.mce.compute()),
            nll=float(self.nll.compute()),
            brier=float(self.brier.compute()),
            accuracy=float(bins["correct"].sum() / bins["images"].sum().clamp_min(1)),
            bins=bins,
        )


def summarize(probabilities: torch.Tensor, labels: torch.Tensor) -> CalibrationSummary:
    metric = CalibrationMetric(probabilities.shape[1])
    metric.update(probabilities, labels)
    return metric.compute()


def calibration_rows(summary: CalibrationSummary) -> list[list[str]]:
    """The bins (one row each), a blank row, then the summary numbers: what `calibration.csv` holds."""
    rows = [["bin", "lower", "upper", "images", "mean_confidence", "accuracy"]]
    bins = len(summary.bins["images"])
    for index, (count, confidence, correct) in enumerate(zip(*summary.bins.values(), strict=True)):
        averages = [f"{float(confidence / count):.4f}", f"{float(correct / count):.4f}"] if count else ["", ""]
        rows.append([str(index + 1), f"{index / bins:.4f}", f"{(index + 1) / bins:.4f}", str(int(count)), *averages])
    rows += [[], ["metric", "value"]]
    rows += [[f"ece ({bins} bins)", f"{summary.ece:.4f}"], [f"mce ({bins} bins)", f"{summary.mce:.4f}"]]
    rows += [["nll", f"{summary.nll:.4f}"], ["brier", f"{summary.brier:.4f}"], ["accuracy", f"{summary.accuracy:.4f}"]]
    return rows


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T); argmax is unchanged."""
    logits = logits.double()
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(.) stays positive
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_temperature.detach().exp())


@torch.no_grad()
def logits_of(model: FashionMNISTClassifier, split: TensorBatchDataset) -> torch.Tensor:
    """float32 logits of a whole split, before any temperature (the model in eval mode on the CPU)."""
    batches = [
        model(split.images[start : start + INFERENCE_BATCH]).float() for start in range(0, len(split), INFERENCE_BATCH)
    ]
    return torch.cat(batches)


@dataclass
class CalibrationResult:
    """What `fmnist calibrate` fitted and measured, and the files it wrote."""

    temperature: float
    validation_images: int
    before: CalibrationSummary  # on the test set, with the checkpoint's own temperature
    after: CalibrationSummary
    checkpoint: Path
    figure: Path


def calibrate_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    data_dir: str | None = None,
    system_dir: str | None = None,
    overwrite: bool = False,
) -> CalibrationResult:
    """Fit the temperature on the checkpoint's own validation split; write a new checkpoint carrying it, and
    its diagrams beside it (same name, .png): both or neither."""
    model, checkpoint = model_from_checkpoint(ckpt_path)
    path = Path(ckpt_path)
    destination = Path(output) if output else path.with_name(f"{path.stem}-calibrated.ckpt")
    figure_path = destination.with_suffix(".png")
    check_calibration_outputs(path, destination, figure_path, overwrite)
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    settings: dict[str, Any] = {name: saved[name] for name in SPLIT_DATA_SETTINGS if name in saved}
    settings |= {name: value for name, value in (("data_dir", data_dir), ("system_dir", system_dir)) if value}
    data = FashionMNISTDataModule(**settings, data_on_device=False)
    data.prepare_data()
    data.setup("validate")
    data.setup("test")
    val_logits = logits_of(model, data.val_set)
    temperature = fit_temperature(val_logits, data.val_set.labels)
    test_logits, test_labels = logits_of(model, data.test_set), data.test_set.labels
    before = summarize((test_logits / model.hparams.temperature).softmax(dim=1), test_labels)
    after = summarize((test_logits / temperature).softmax(dim=1), test_labels)

    from fmnist_lightning.plots import calibration_figure, write_figure  # matplotlib only when drawing

    panels = {"before": before, f"after (temperature {temperature:.3f})": after}
    figure = calibration_figure(panels, "on the test set, temperature fitted on the validation split")
    checkpoint["hyper_parameters"]["temperature"] = temperature
    # Both under temporary names until both are complete; the checkpoint is renamed into place first.
    with atomic_write(figure_path) as figure_file, atomic_write(destination) as checkpoint_file:
        write_figure(figure, figure_file, "png")
        torch.save(checkpoint, checkpoint_file)
    return CalibrationResult(temperature, len(data.val_set), before, after, destination, figure_path)


def check_calibration_outputs(source: Path, destination: Path, figure: Path, overwrite: bool) -> None:
    """Refuse, before any work, outputs that would replace the checkpoint being read, collide with each other,
    or replace an existing file unasked. Files are compared as files (device and inode), not as path strings,
    so `x/../x/a.ckpt` and a path through a linked folder are seen for what they are."""
    if destination.suffix != ".ckpt":
        raise UserError(
            f"--output {destination}: a calibrated checkpoint is a .ckpt file (its diagrams go beside it as "
            f"{figure.name}); give a name ending in .ckpt"
        )
    if same_file(destination, source):
        raise UserError(
            f"--output {destination} is the checkpoint being calibrated ({source}); it is never changed, choose another"
        )
    if same_file(figure, source):
        raise UserError(f"--output {destination}: its diagrams {figure} would replace {source}; choose another")
    for option, output in (("--output", destination), ("its diagrams", figure)):
        ensure_output_path(output, "--output")
        if output.exists() and not overwrite:
            raise UserError(f"{output} exists ({option}); give another --output, or --overwrite true to replace it")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, however they reach it (links, `..`); False if either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
