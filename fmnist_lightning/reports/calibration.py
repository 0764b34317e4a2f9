"""Whether the model's probabilities mean what they say (ECE, MCE, NLL, Brier score, reliability bins), and
`fmnist calibrate`: one temperature fitted on the validation split, saved in a new checkpoint."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassCalibrationError

from fmnist_lightning import CLASS_NAMES

CALIBRATION_BINS = 15  # equal-width top-1 confidence bins, the usual choice for ECE


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
