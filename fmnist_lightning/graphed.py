"""A training step replayed as one CUDA graph, so that a GPU step costs one launch instead of a hundred.

At batch 64 each of this network's kernels is a few microseconds of GPU work, so an eager GPU step is
bounded by the host: launching about a hundred kernels, and the Python around them (the metric updates
alone are two dozen small kernels). A CUDA graph records the step's kernels once and replays them all
with one call. The graph holds the forward pass, the loss, the metric updates and the backward pass;
the optimizer step stays with Lightning (one kernel per parameter group with `fused: true`), so its
step counting, gradient clipping and learning-rate schedules work as without the graph.
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

    A captured graph reads its inputs from, and writes the loss and the gradients to, the same tensors
    at every replay; each batch is copied into its input tensors first. Hence:

    - a batch of another shape (the short last batch of an epoch) runs eagerly, which gives the
      parameters new gradient tensors, so the next batch captures the graph again;
    - whoever replaces a tensor the graph writes to (torchmetrics' `reset()` makes new state tensors)
      must call `invalidate()`; the next batch captures again (a capture takes milliseconds);
    - the `metrics` the step updates keep their state tensors: torchmetrics' accuracy updates by
      rebinding (`tp = tp + batch_tp`), which in a graph would write every replay's sum to the same new
      tensor, from the same old one; the captured step copies each such sum back into the old tensor.

    The warm-up steps are real training steps, run on a side stream as CUDA graphs require: the CUDA
    libraries initialise lazily on first use, which must happen before a capture.
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
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            loss = self.step(images, labels)
        torch.cuda.current_stream(images.device).wait_stream(side)
        return loss

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        # Without gradient tensors, the captured backward pass writes fresh ones (in the graph's memory)
        # instead of adding to old ones, and every replay overwrites them: no zero_grad needed.
        self._drop_gradients()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _autocast_without_cache(images.device.type):
            self.loss = self._step_keeping_metric_states()

    def _step_keeping_metric_states(self) -> torch.Tensor:
        """The step on the graph's input tensors, leaving every metric state in the tensor it was in."""
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
    """Mixed precision as the caller has it, but with every cast recorded in the graph.

    Autocast caches the low-precision copies of the weights for as long as its context lasts; a graph
    captured with a cached copy would replay stale weights. (PyTorch's CUDA graph notes ask for
    `cache_enabled=False` during capture.)
    """
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class CudaGraphTraining(L.Callback):
    """Replays the training steps of a fit on one GPU as CUDA graphs (`model.cuda_graph`); elsewhere nothing.

    At fit start the module's `training_step`, `backward` and `optimizer_zero_grad` are shadowed on the
    module object (Lightning calls its hooks through the object), and restored when the fit ends: the
    graphed step runs the module's own training step and its backward pass, so Lightning's backward must
    not run again, and its `zero_grad` must not take away the gradients each replay writes in place.
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
