"""What a test run keeps besides its scores: the most confident mistakes and a sample of predictions."""

from dataclasses import dataclass, field

import torch


@dataclass
class PredictionExamples:
    """Images with their true class, predicted class and that prediction's probability (all on the CPU)."""

    images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 1, 28, 28, dtype=torch.uint8))
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    predicted: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    confidence: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def __len__(self) -> int:
        return len(self.labels)

    def extended(
        self, images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, confidence: torch.Tensor
    ) -> "PredictionExamples":
        """A copy with more examples appended (moved to the CPU)."""
        return PredictionExamples(
            torch.cat([self.images, images.cpu()]),
            torch.cat([self.labels, labels.cpu()]),
            torch.cat([self.predicted, predicted.cpu()]),
            torch.cat([self.confidence, confidence.float().cpu()]),
        )

    def subset(self, index: torch.Tensor) -> "PredictionExamples":
        return PredictionExamples(self.images[index], self.labels[index], self.predicted[index], self.confidence[index])


class ExampleCollector:
    """Streams over test batches keeping the `gallery_size` most confident mistakes and the first samples."""

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
