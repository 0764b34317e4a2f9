"""`model.cuda_graph`: a training step replayed as a CUDA graph trains exactly like the eager step.

On a CPU a stand-in keeps a CUDA graph's contract (fixed input tensors, gradients overwritten at every
replay, capture again after an eager step or a metric reset) and runs the step eagerly; on a GPU the
same checks run with real graphs.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.training import graphed as graphed_file
from fmnist_lightning.training.graphed import CudaGraphTraining, GraphedStep

# 320 training images in batches of 48: six full batches and a short one of 32 per epoch
BATCH = 48


class EagerStandIn(GraphedStep):
    """A CUDA graph's contract on a CPU: a replay runs the step on the graph's own input tensors."""

    captures = 0

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        self.graph = "captured"
        EagerStandIn.captures += 1

    def _replay(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.images.copy_(images)
        self.labels.copy_(labels)
        self._drop_gradients()  # a replay overwrites the gradients
        return self._step_keeping_metric_states()


def fit_tiny(
    data_dir, accelerator: str, epochs: int = 2, precision: str = "32-true", **model_options
) -> tuple[FashionMNISTClassifier, dict[str, float]]:
    L.seed_everything(0)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=BATCH, download=False)
    model = FashionMNISTClassifier(channels_last=True, pool_before_relu=True, **model_options)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    return model, {name: float(value) for name, value in trainer.callback_metrics.items()}


def assert_same_training(graphed, eager, tolerance: float = 0.0) -> None:
    (graphed_model, graphed_metrics), (eager_model, eager_metrics) = graphed, eager
    for (name, value), expected in zip(
        graphed_model.state_dict().items(), eager_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance, msg=name)
    assert graphed_metrics.keys() == eager_metrics.keys() >= {"train_acc", "train_loss", "val_acc"}
    for name, value in graphed_metrics.items():
        assert value == pytest.approx(eager_metrics[name], abs=tolerance)


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(graphed_file, "can_capture", lambda device: True)
    monkeypatch.setattr(graphed_file, "GraphedStep", EagerStandIn)
    EagerStandIn.captures = 0


def test_a_graphed_step_keeps_metric_states_in_their_tensors():
    # torchmetrics' accuracy rebinds its counts (tp = tp + batch_tp); a graph would replay that into one
    # new tensor from the same old one, so the step must copy the sums back
    accuracy = MulticlassAccuracy(3, average="micro", validate_args=False)
    weight = torch.nn.Parameter(torch.eye(3))

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores = images @ weight
        accuracy.update(scores, labels)
        loss = F.cross_entropy(scores, labels)
        loss.backward()
        return loss.detach()

    states = dict(accuracy.metric_state)
    graphed = EagerStandIn(step, [weight], metrics=[accuracy], warmup_steps=0)
    images, labels = torch.eye(3).repeat(3, 1), torch.tensor([0, 1, 2, 0, 1, 1, 2, 2, 2])
    for batch in range(3):
        graphed(images[3 * batch : 3 * batch + 3], labels[3 * batch : 3 * batch + 3])
    assert all(getattr(accuracy, name) is tensor for name, tensor in states.items())
    assert float(accuracy.compute()) == pytest.approx(6 / 9)
    assert weight.grad is not None


def test_graphed_steps_train_exactly_like_eager_steps(graphs_on_cpu, tiny_data_dir):
    graphed = fit_tiny(tiny_data_dir, "cpu", cuda_graph=True, batch_norm=True, dropout=0.2)
    # epoch 0: three warm-up steps, a capture, two replays, the short batch eagerly; epoch 1: a capture
    # (the metrics were reset), five replays, the short batch
    assert EagerStandIn.captures == 2
    assert_released(graphed[0])
    eager = fit_tiny(tiny_data_dir, "cpu", cuda_graph=False, batch_norm=True, dropout=0.2)
    assert EagerStandIn.captures == 2  # the reference is eager
    assert_same_training(graphed, eager)


def assert_released(model: FashionMNISTClassifier) -> None:
    """After fit: the graph freed, the module's own hooks back."""
    (callback,) = [callback for callback in model.trainer.callbacks if isinstance(callback, CudaGraphTraining)]
    assert callback.step is None
    assert not set(CudaGraphTraining.HOOKS) & vars(model).keys()


@pytest.mark.parametrize(
    ("compile", "trainer_settings", "setting"),
    [
        (True, {}, "model.compile"),
        (False, {"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches > 1"),
        (False, {"precision": "16-mixed"}, "trainer.precision 16-mixed"),
    ],
)
def test_graphed_steps_refuse_settings_they_would_get_wrong(graphs_on_cpu, compile, trainer_settings, setting):
    model = FashionMNISTClassifier(cuda_graph=True, compile=compile)
    trainer = SimpleNamespace(
        **{"world_size": 1, "accumulate_grad_batches": 1, "precision": "32-true", **trainer_settings}
    )
    with pytest.raises(UserError, match=f"model.cuda_graph does not work with {setting}; set --model.cuda_graph false"):
        CudaGraphTraining().on_fit_start(trainer, model)
    assert not set(CudaGraphTraining.HOOKS) & vars(model).keys()


def test_cuda_graph_has_no_effect_on_a_cpu(tiny_data_dir):
    model, _ = fit_tiny(tiny_data_dir, "cpu", epochs=1, cuda_graph=True)
    (callback,) = [callback for callback in model.trainer.callbacks if isinstance(callback, CudaGraphTraining)]
    assert callback.step is None and model.hparams.cuda_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("precision", "dropout"), [("32-true", 0.0), ("bf16-mixed", 0.0), ("32-true", 0.2)])
def test_real_cuda_graphs_train_like_eager_steps_on_a_gpu(tiny_data_dir, precision, dropout, monkeypatch):
    captures = []
    real_capture = GraphedStep._capture

    def counted_capture(self: GraphedStep, images: torch.Tensor, labels: torch.Tensor) -> None:
        captures.append(images.shape)
        real_capture(self, images, labels)

    monkeypatch.setattr(GraphedStep, "_capture", counted_capture)
    graphed = fit_tiny(tiny_data_dir, "gpu", precision=precision, cuda_graph=True, batch_norm=True, dropout=dropout)
    eager = fit_tiny(tiny_data_dir, "gpu", precision=precision, cuda_graph=False, batch_norm=True, dropout=dropout)
    assert captures == [(BATCH, 1, 28, 28)] * 2
    # the same kernels in the same order; only cuBLAS/cuDNN's choice of algorithm may differ
    assert_same_training(graphed, eager, tolerance=1e-4 if precision == "32-true" else 1e-2)


def test_while_graphed_lightnings_backward_and_zero_grad_leave_the_replayed_gradients(graphs_on_cpu):
    model = FashionMNISTClassifier(cuda_graph=True)
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, precision="32-true")
    callback = CudaGraphTraining()
    callback.on_fit_start(trainer, model)
    assert set(CudaGraphTraining.HOOKS) <= vars(model).keys()
    weight = model.network.dense.weight
    weight.grad = torch.ones_like(weight)  # what a replay leaves in place for the optimizer step
    model.optimizer_zero_grad(0, 0, torch.optim.SGD(model.parameters(), lr=0.1))
    model.backward(torch.tensor(1.0, requires_grad=True))
    assert torch.equal(weight.grad, torch.ones_like(weight))
    callback.on_fit_end(trainer, model)
    assert not set(CudaGraphTraining.HOOKS) & vars(model).keys() and callback.step is None
