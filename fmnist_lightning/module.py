"""The LightningModule: the original network, its loss, its metrics and its optimizer."""

import inspect
import math
import os
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable, instantiate_module
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lightning.data.batches import Batch
from fmnist_lightning.data.datamodule import NUM_CLASSES
from fmnist_lightning.errors import UserError
from fmnist_lightning.network import InputScaling, build_network
from fmnist_lightning.training.checkpoints import first_line, load_checkpoint, load_weights
from fmnist_lightning.training.graphed import CudaGraphTraining
from fmnist_lightning.training.settings import ARCHITECTURE_SETTINGS

STAGES = ("train", "val", "test")


class FashionMNISTClassifier(LightningModule):
    """The Keras original's CNN with cross-entropy on logits (= softmax + categorical cross-entropy).

    Metrics update every step and are logged once per epoch (`{stage}_acc`, `{stage}_loss`), so a step
    never waits for the host. Options beyond the original are off; speed-only settings are on.

    On a single GPU with `cuda_graph` (the default), `training/graphed.py`'s `CudaGraphTraining` replaces this
    instance's `training_step`, `backward` and `optimizer_zero_grad` for the fit: it replays `training_step`
    below and its backward pass as one CUDA graph. The numbers are the same; the step you read is the one that
    is captured. On a CPU, or with `--model.cuda_graph false`, the methods below run as written.

    Args:
        optimizer: Built from the model's parameters; Adam with lr 1e-3 like the original.
        architecture: "original" (the Keras CNN), "mobilenet_v2" (torchvision's, for transfer learning) or
            "resnet" (a pre-activation ResNet, `depth` and `width`).
        normalize: Standardise pixels with the training set's mean and std after scaling to [0, 1].
        batch_norm: BatchNorm after each convolution of the original network (+320 parameters).
        dropout: Dropout after pool 1, pool 2, conv 3 and the dense layer: one rate for all, or four.
        label_smoothing: Label smoothing of the training loss (validation and test losses stay plain).
        lr_schedule: "constant", "onecycle" (up to the optimizer's lr) or "cosine" (after warm-up); per batch.
        warmup_epochs: Linear warm-up length for "cosine".
        pretrained: For "mobilenet_v2": true: torchvision's ImageNet weights (downloaded once); a path: those
            weights from a local file (`torch.save(state_dict)`), for machines without internet.
        pool_before_relu: Max-pool before the ReLU in the first two blocks: same numbers, less work.
        channels_last: NHWC memory format for the convolutions: same numbers, faster kernels.
        compile: `torch.compile` the network: true for the default mode, or a mode name.
        cuda_graph: On a single GPU, replay each training step as one CUDA graph: same numbers, faster.
        tta: Test-time augmentation for test and predict (mean with the mirror image); not saved in checkpoints.
        temperature: Divides the logits outside training (`fmnist calibrate` fits it); 1: the network as trained.
        depth: For "resnet": layers, 6n + 2 (20: ResNet-20).
        width: For "resnet": channels of the first stage (the others have 2x and 4x).
        teacher: Knowledge distillation: a checkpoint of this project whose soft predictions the model also
            learns from (loaded safely, frozen, in eval mode, on the same augmented batch); None: off.
        distill_temperature: Softening of both models' logits in the distillation loss.
        distill_weight: Share of the distillation loss in the training loss (the rest: cross-entropy).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        architecture: Literal["original", "mobilenet_v2", "resnet"] = "original",
        normalize: bool = False,
        batch_norm: bool = False,
        dropout: float | list[float] = 0.0,
        label_smoothing: float = 0.0,
        lr_schedule: Literal["constant", "onecycle", "cosine"] = "constant",
        warmup_epochs: float = 0.0,
        pretrained: bool | str = False,
        pool_before_relu: bool = True,
        channels_last: bool = True,
        compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False,
        cuda_graph: bool = True,
        tta: bool = False,
        temperature: float = 1.0,
        depth: int = 20,
        width: int = 16,
        teacher: str | None = None,
        distill_temperature: float = 4.0,
        distill_weight: float = 0.9,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tta"])  # how to evaluate, not what was trained
        self.optimizer_factory = optimizer
        self.label_smoothing = label_smoothing
        self.lr_schedule = lr_schedule
        self.warmup_epochs = warmup_epochs
        self.test_time_augmentation = tta
        if not temperature > 0:
            raise UserError(f"model.temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.teacher_path = teacher
        self.distill_temperature = distill_temperature
        self.distill_weight = distill_weight
        self.teacher: FashionMNISTClassifier | None = None  # loaded when fit starts; never saved with the model
        self.input_scaling = InputScaling(normalize)
        given = {"batch_norm": batch_norm, "dropout": dropout, "depth": depth, "width": width, "pretrained": pretrained}
        check_architecture_settings(architecture, given, self.default_settings())
        try:
            if not distill_temperature > 0 or not 0 <= distill_weight <= 1:
                raise ValueError(f"distill_temperature must be > 0 and distill_weight in [0, 1], got "
                                 f"{distill_temperature} and {distill_weight}")  # fmt: skip
            self.network = build_network(architecture, NUM_CLASSES, pool_before_relu, **given)
        except ValueError as error:
            raise UserError(f"model: {error}") from None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network.to(memory_format=self.memory_format)
        if compile:
            # in place: parameter names, hence checkpoints, stay the same
            self.network.compile(mode=None if compile is True else compile)
        # One metric object per stage, synced by torchmetrics under DDP; saved in checkpoints, so an epoch
        # resumed half-way reports the same numbers.
        for stage in STAGES:
            setattr(self, f"{stage}_acc", MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False))
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
            for metric in self.stage_metrics(stage).values():
                metric.persistent(True)
        # The fit-start summary shows each layer's output shape, like Keras's (two images for BatchNorm).
        self.example_input_array = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> tuple["FashionMNISTClassifier", dict[str, Any]]:
        """The model a checkpoint was trained with (its saved settings, its weights), in eval mode, and the
        checkpoint itself, read once, for callers that want more of it. Read safely (`load_checkpoint`)."""
        checkpoint = load_checkpoint(path)
        settings = {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key[0] != "_"}
        try:
            model = instantiate_module(cls, settings)
        except Exception as error:  # jsonargparse reports unknown or ill-typed settings in many ways
            raise UserError(f"{path} was not saved by this project's model ({first_line(error)})") from error
        load_weights(model, checkpoint, path)
        return model.eval(), checkpoint

    @classmethod
    def default_settings(cls) -> dict[str, Any]:
        """Every setting's default, from the signature (the settings table says what kind each is)."""
        return {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 28x28 grayscale images (uint8 0-255, or float in [0, 1])."""
        return self.network(self.input_scaling(images).contiguous(memory_format=self.memory_format))

    def scaled_logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits divided by the temperature: under bf16 autocast the network's are bf16-rounded."""
        return self(images).float() / self.temperature

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """float32 class probabilities; with test-time augmentation, averaged with the mirror image's."""
        probabilities = self.scaled_logits(images).softmax(dim=1)
        if self.test_time_augmentation:
            probabilities = (probabilities + self.scaled_logits(images.flip(-1)).softmax(dim=1)) / 2
        return probabilities

    def _shared_step(self, batch: Batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (logits, or probabilities under test-time augmentation) and mean loss; updates metrics.

        Validation and test losses are float32 and use the temperature, like every reported probability.
        """
        images, labels = batch
        if stage == "test" and self.test_time_augmentation:
            scores = self.probabilities(images)
            losses = F.nll_loss(scores.clamp_min(1e-12).log(), labels, reduction="none")
        elif stage == "train":  # training may stay in the autocast precision
            scores = self(images)
            losses = F.cross_entropy(scores, labels, reduction="none", label_smoothing=self.label_smoothing)
            if self.teacher is not None:
                losses = (1 - self.distill_weight) * losses + self.distill_weight * self._distillation(images, scores)
        else:
            scores = self.scaled_logits(images)
            losses = F.cross_entropy(scores, labels, reduction="none")
        self.stage_metrics(stage)["acc"].update(scores, labels)
        # Per-image losses, so the epoch mean is exact for a short last batch (MeanMetric's `weight` is
        # ignored with nan_strategy="disable", the setting that keeps the step free of host syncs).
        self.stage_metrics(stage)["loss"].update(losses.detach())
        return scores, losses.mean()

    def _distillation(self, images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Per-image KL divergence from the teacher's softened predictions, times T^2 (Hinton et al.), so its
        gradients keep their size whatever the temperature."""
        with torch.no_grad():
            target = (self.teacher(images).float() / self.distill_temperature).log_softmax(dim=1)
        student = (scores.float() / self.distill_temperature).log_softmax(dim=1)
        divergence = F.kl_div(student, target, reduction="none", log_target=True).sum(dim=1)
        return divergence * self.distill_temperature**2

    def on_fit_start(self) -> None:
        """Load the teacher: only for training, so that scoring a student never needs its teacher's file."""
        if self.teacher_path:
            teacher, _ = type(self).from_checkpoint(self.teacher_path)
            object.__setattr__(self, "teacher", teacher.to(self.device).requires_grad_(False))  # not a submodule

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[1]

    def configure_callbacks(self) -> list[L.Callback]:
        """`cuda_graph`: the training steps replayed as CUDA graphs, by a callback of their own."""
        return [CudaGraphTraining()] if self.hparams.cuda_graph else []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Also returns the probabilities, for callbacks that report on the test set (TestReport)."""
        scores, _ = self._shared_step(batch, "test")
        return {"probabilities": scores if self.test_time_augmentation else scores.softmax(dim=1)}

    def predict_step(self, batch: Sequence[Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities with the batch's labels (-1: unknown); batches start with images and labels."""
        images, labels = batch[0], batch[1]
        return {"probabilities": self.probabilities(images), "labels": labels}

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def stage_metrics(self, stage: str) -> dict[str, Metric]:
        return {"acc": getattr(self, f"{stage}_acc"), "loss": getattr(self, f"{stage}_loss")}

    def _log_epoch_metrics(self, stage: str) -> None:
        # compute() already reduces over all processes; sync_dist only tells Lightning the value is global.
        for name, metric in self.stage_metrics(stage).items():
            self.log(f"{stage}_{name}", metric.compute(), prog_bar=stage == "val", sync_dist=True)
            metric.reset()

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory(self.parameters())
        except (ValueError, TypeError) as error:  # torch.optim's checks of lr, betas, eps, weight_decay
            raise UserError(f"model.optimizer: {error}") from None
        if self.lr_schedule == "constant":
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        if self.lr_schedule == "onecycle":
            peaks = [group["lr"] for group in optimizer.param_groups]
            scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps)
        else:
            warmup = round(self.warmup_epochs * total_steps / max(1, self.trainer.max_epochs))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_architecture_settings(architecture: str, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a setting of another architecture than the chosen one (the settings table says whose each is): it
    would be ignored without a word. Its default, or all-zero dropout rates, mean "not used"."""
    for name, value in settings.items():
        owner = ARCHITECTURE_SETTINGS[name]
        rates = value if isinstance(value, list | tuple) else [value]
        if owner != architecture and not all(rate == defaults[name] for rate in rates):
            raise UserError(
                f"model.{name} {value!r} only applies to model.architecture {owner}, and this run's is "
                f"{architecture}; leave it out, or set --model.architecture {owner}"
            )


def warmup_cosine(warmup_steps: int, total_steps: int, step: int) -> float:
    """Learning-rate factor: linear from ~0 to 1 over the warm-up, then cosine down to 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
