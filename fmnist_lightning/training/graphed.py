"""A training step replayed as one CUDA graph, so a small GPU step costs one launch instead of a hundred.

The graph holds forward, loss, metric updates and backward; the optimizer step stays with Lightning.
"""

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from fmnist_lightning.errors import UserError

# (images, labels) -> the detached loss, after it has put the gradients in the parameters' .grad
StepWithGradients = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def can_capture(device: torch.device) -> bool:
    """Whether a training step on `device` can be replayed as a CUDA graph."""
    return device.type == "cuda"


class GraphedStep:
    """Runs `step(images, labels)` eagerly for `warmup_steps` calls, then captures it and replays it.

    A graph reuses its tensors: other batch shapes run eagerly, and replacing one needs `invalidate()`.
    """

    def __init__(
        self,
        step: StepWithGradients,
        parameters: Iterable[torch.nn.Parameter],
        metrics: Iterable[Metric] = (),
        warmup_steps: int = 3,
    ):
        self.step = step
        self.parameters = list(parameters)
        self.metrics = list(metrics)
        self.warmup_left = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.images = self.labels = self.loss = torch.empty(0)  # the graph's own tensors, once captured

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.graph is not None and images.shape == self.images.shape:
            return self._replay(images, labels)
        if self.warmup_left > 0 or self.graph is not None:  # warming up, or a batch of another shape
            self.warmup_left = max(0, self.warmup_left - 1)
            return self._eager(images, labels)
        self._capture(images, labels)
        return self._replay(images, labels)

    def invalidate(self) -> None:
        """Capture again at the next batch (a tensor the graph writes to was replaced)."""
        self.graph = None

    def _eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.graph = None  # the step is about to give the parameters new gradient tensors
        self._drop_gradients()
        if not images.is_cuda:
            return self.step(images, labels)
        # On a side stream, as capture requires: CUDA libraries initialise lazily, and must before a capture.
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            loss = self.step(images, labels)
        torch.cuda.current_stream(images.device).wait_stream(side)
        return loss

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        # With no .grad, the captured backward writes fresh ones that every replay overwrites: no zero_grad.
        self._drop_gradients()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _autocast_without_cache(images.device.type):
            self.loss = self._step_keeping_metric_states()

    def _step_keeping_metric_states(self) -> torch.Tensor:
        """The step, with metric states copied back: torchmetrics rebinds them (`tp = tp + x`), a graph must not."""
        states = [(metric, name, getattr(metric, name)) for metric in self.metrics for name in metric.metric_state]
        loss = self.step(self.images, self.labels)
        for metric, name, tensor in states:
            updated = getattr(metric, name)
            if isinstance(tensor, torch.Tensor) and updated is not tensor:
                tensor.copy_(updated)
                setattr(metric, name, tensor)
        return loss

    def _replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss

    def _drop_gradients(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None


def _autocast_without_cache(device_type: str) -> AbstractContextManager:
    """Mixed precision as the caller has it, without autocast's weight cache: a graph would replay stale weights."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class CudaGraphTraining(L.Callback):
    """Replays the training steps of a fit on one GPU as CUDA graphs (`model.cuda_graph`); elsewhere nothing.

    During the fit the graph does backward itself, so the module's step, backward and zero_grad are shadowed.
    """

    HOOKS = ("training_step", "backward", "optimizer_zero_grad")

    def __init__(self) -> None:
        self.step: GraphedStep | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = None
        if not (can_capture(pl_module.device) and trainer.world_size == 1):
            return
        conflicts = {
            "model.compile": pl_module.hparams.compile,  # torch.compile's CUDA graphs and this one do not nest
            "trainer.accumulate_grad_batches > 1": trainer.accumulate_grad_batches > 1,  # a replay overwrites
            "trainer.precision 16-mixed": trainer.precision == "16-mixed",  # scales the loss in backward()
        }
        for setting, conflicting in conflicts.items():
            if conflicting:
                raise UserError(f"model.cuda_graph does not work with {setting}; set --model.cuda_graph false")
        self.step = GraphedStep(
            partial(_step_with_gradients, pl_module), pl_module.parameters(), pl_module.stage_metrics("train").values()
        )
        step = self.step
        pl_module.training_step = lambda batch, batch_idx: step(*batch)
        pl_module.backward = pl_module.optimizer_zero_grad = _done_by_the_graph

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step is not None:
            self.step.invalidate()  # the epoch-end metric reset gave the metrics new state tensors

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        for hook in self.HOOKS:
            pl_module.__dict__.pop(hook, None)  # the class's own methods again
        self.step = None  # frees the graph and its memory


def _step_with_gradients(module: L.LightningModule, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The module's own training step and its backward pass: the part of a step a CUDA graph holds."""
    loss = type(module).training_step(module, (images, labels), 0)
    with torch.autocast(module.device.type, enabled=False):  # outside mixed precision, as Lightning does
        loss.backward()
    return loss.detach()


def _done_by_the_graph(*args: Any, **kwargs: Any) -> None:
    """Stands in for Lightning's backward pass and zero_grad, which the graphed step does itself."""
