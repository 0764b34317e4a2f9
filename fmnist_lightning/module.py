"""The LightningModule: the original network, its loss, its metrics and its optimizer."""

from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lightning.batches import Batch
from fmnist_lightning.data import NUM_CLASSES
from fmnist_lightning.network import InputScaling, original_cnn

STAGES = ("train", "val", "test")


class FashionMNISTClassifier(LightningModule):
    """The Keras original's CNN trained with cross-entropy on logits (= softmax + categorical cross-entropy).

    Metrics are updated every step and logged once per epoch as `{stage}_acc` and `{stage}_loss`, so a
    step costs no host synchronisation and no logging work.

    Args:
        optimizer: Built from the model's parameters; Adam with lr 1e-3 like the original.
        lr_scheduler: Optional, stepped once per epoch.
        normalize: Standardise pixels with the training set's mean and std after scaling to [0, 1].
        pool_before_relu: Max-pool before the ReLU in the first two blocks: the same function and
            gradients, less work (see `original_cnn`).
        channels_last: Run the convolutions in NHWC memory format, which oneDNN (CPU) and cuDNN (GPU)
            handle faster than NCHW; the numbers are the same.
        compile: `torch.compile` the network (pays off on GPUs; on a small CPU the compiled step is slower).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        normalize: bool = False,
        pool_before_relu: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.input_scaling = InputScaling(normalize)
        self.network = original_cnn(NUM_CLASSES, pool_before_relu)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network.to(memory_format=self.memory_format)
        if compile:
            self.network.compile()  # in place: parameter names, hence checkpoints, stay the same
        # One metric object per stage (train_acc, val_loss, ...); torchmetrics syncs them under DDP.
        for stage in STAGES:
            setattr(self, f"{stage}_acc", MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False))
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
        # Lets the fit-start summary show every layer's output shape, like the Keras summary.
        self.example_input_array = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 28x28 grayscale images (uint8 0-255, or float in [0, 1])."""
        return self.network(self.input_scaling(images).contiguous(memory_format=self.memory_format))

    def _shared_step(self, batch: Batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and mean loss of a batch; updates the stage's metrics."""
        images, labels = batch
        logits = self(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.stage_metrics(stage)["acc"].update(logits, labels)
        # Per-image losses, so the epoch mean is exact for a short last batch. (MeanMetric's `weight`
        # is ignored with nan_strategy="disable", which keeps the step free of host syncs.)
        self.stage_metrics(stage)["loss"].update(losses.detach())
        return logits, losses.mean()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[1]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Also returns the probabilities, for callbacks that report on the test set (TestReport)."""
        logits, _ = self._shared_step(batch, "test")
        return {"probabilities": logits.softmax(dim=1)}

    def predict_step(self, batch: Batch | dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class probabilities with the batch's labels (-1: unknown) and, for image files, paths and errors."""
        if isinstance(batch, dict):
            images, extra = batch["images"], {key: batch[key] for key in ("labels", "paths", "errors")}
        else:
            images, labels = batch
            extra = {"labels": labels}
        return {"probabilities": self(images).softmax(dim=1), **extra}

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def stage_metrics(self, stage: str) -> dict[str, Metric]:
        return {"acc": getattr(self, f"{stage}_acc"), "loss": getattr(self, f"{stage}_loss")}

    def _log_epoch_metrics(self, stage: str) -> None:
        # compute() already reduces over all processes, so the logged values need no further sync.
        for name, metric in self.stage_metrics(stage).items():
            self.log(f"{stage}_{name}", metric.compute(), prog_bar=stage == "val")
            metric.reset()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
