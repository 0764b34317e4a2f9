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

import torch
from torchmetrics import Metric

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
