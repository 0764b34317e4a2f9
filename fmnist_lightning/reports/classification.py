"""The test report's content: per-class numbers from torchmetrics, their CSV / Markdown rows, and the
examples its pictures show (the most confident mistakes, a sample of predictions)."""

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.outputs import atomic_write

SCORES = ("precision", "recall", "f1")
AVERAGES = ("macro", "micro")


@dataclass
class ClassificationReport:
    """Confusion counts (rows: true class) and precision/recall/F1 per class and averaged."""

    confusion: torch.Tensor
    per_class: dict[str, torch.Tensor]
    averages: dict[str, dict[str, float]]

    @property
    def support(self) -> torch.Tensor:
        return self.confusion.sum(dim=1)


class ClassificationReportMetric(MetricCollection):
    """The metrics behind a `ClassificationReport`; MetricCollection syncs them across processes under DDP."""

    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        score_classes = {"precision": MulticlassPrecision, "recall": MulticlassRecall, "f1": MulticlassF1Score}
        metrics: dict[str, Metric] = {"confusion": MulticlassConfusionMatrix(num_classes)}
        for average in (None, *AVERAGES):
            for score, metric_class in score_classes.items():
                metrics[f"{score}_{average or 'class'}"] = metric_class(num_classes, average=average)
        super().__init__(metrics)

    def compute(self) -> ClassificationReport:
        values = {name: value.cpu() for name, value in super().compute().items()}
        return ClassificationReport(
            confusion=values["confusion"],
            per_class={score: values[f"{score}_class"] for score in SCORES},
            averages={avg: {score: float(values[f"{score}_{avg}"]) for score in SCORES} for avg in AVERAGES},
        )


def report_rows(report: ClassificationReport, class_names: Sequence[str] = CLASS_NAMES) -> list[list[str]]:
    """Header, one row per class, then the macro and micro averages; numbers to 4 decimals."""
    rows = [["class", *SCORES, "support"]]
    for index, name in enumerate(class_names):
        scores = [f"{float(report.per_class[score][index]):.4f}" for score in SCORES]
        rows.append([name, *scores, str(int(report.support[index]))])
    total = str(int(report.support.sum()))
    for average in AVERAGES:
        rows.append([f"{average} average", *(f"{report.averages[average][s]:.4f}" for s in SCORES), total])
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_csv(rows: Sequence[Sequence[str]], path: str | os.PathLike) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)


def confusion_rows(
    confusion: torch.Tensor, normalize: bool = False, class_names: Sequence[str] = CLASS_NAMES
) -> list[list[str]]:
    """The matrix as CSV rows (true classes) and columns (predicted); `normalize` divides rows by their sum."""
    if normalize:
        cells = [[f"{value:.4f}" for value in row] for row in row_normalised(confusion).tolist()]
    else:
        cells = [[str(value) for value in row] for row in confusion.tolist()]
    header = ["true \\ predicted", *class_names]
    return [header] + [[name, *row] for name, row in zip(class_names, cells, strict=True)]


def row_normalised(confusion: torch.Tensor) -> torch.Tensor:
    """Recall per true class; a class with no images stays all zeros instead of dividing by zero."""
    return confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass
class PredictionExamples:
    """Images with their true class, predicted class and that prediction's probability (all on the CPU)."""

    images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 1, 28, 28, dtype=torch.uint8))
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    predicted: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    confidence: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def __len__(self) -> int:
        return len(self.labels)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.labels, self.predicted, self.confidence

    def extended(
        self, images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, confidence: torch.Tensor
    ) -> "PredictionExamples":
        pairs = zip(self._tensors(), (images, labels, predicted, confidence.float()), strict=True)
        return PredictionExamples(*(torch.cat([old, new.cpu()]) for old, new in pairs))

    def subset(self, index: torch.Tensor) -> "PredictionExamples":
        return PredictionExamples(*(tensor[index] for tensor in self._tensors()))


class ExampleCollector:
    """Keeps only the `gallery_size` most confident mistakes and the first samples, so memory stays small."""

    def __init__(self, gallery_size: int = 16, sample_size: int = 25) -> None:
        self.gallery_size = gallery_size
        self.sample_size = sample_size
        self.mistakes = PredictionExamples()
        self.samples = PredictionExamples()

    def update(self, images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor) -> None:
        confidence, predicted = probabilities.max(dim=1)
        if len(self.samples) < self.sample_size:
            take = slice(0, self.sample_size - len(self.samples))
            self.samples = self.samples.extended(images[take], labels[take], predicted[take], confidence[take])
        wrong = predicted != labels
        if wrong.any():
            candidates = self.mistakes.extended(images[wrong], labels[wrong], predicted[wrong], confidence[wrong])
            keep = candidates.confidence.topk(min(self.gallery_size, len(candidates))).indices
            self.mistakes = candidates.subset(keep)
