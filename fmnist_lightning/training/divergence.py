"""Stops a fit whose loss has blown up before any checkpoint of that state is written."""

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.errors import UserError
from fmnist_lightning.training.checkpoints import what_is_kept


class DivergenceGuard(L.Callback):
    """Stops a fit whose loss has blown up, after validation and before any checkpoint callback saves it.

    The epoch's mean training loss (summed on the device) and the validation loss must be finite and
    below `EXPLODED` times a uniform guess's, which no learning run comes near.
    """

    EXPLODED = 100

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._steps = torch.zeros((), device=pl_module.device), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self._loss_sum is not None and isinstance(loss, torch.Tensor):
            self._loss_sum += loss.detach().float()
            self._steps += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self._loss_sum is None:
            return
        steps = trainer.strategy.reduce(torch.tensor(float(self._steps), device=pl_module.device), reduce_op="sum")
        train_loss = float(trainer.strategy.reduce(self._loss_sum, reduce_op="sum") / steps.clamp_min(1))
        losses = {"training loss": train_loss if self._steps else 0.0}
        if "val_loss" in trainer.callback_metrics:
            losses["validation loss"] = float(trainer.callback_metrics["val_loss"])
        limit = self.EXPLODED * math.log(len(CLASS_NAMES))
        for name, value in losses.items():
            if not math.isfinite(value) or value > limit:
                checkpoint = trainer.checkpoint_callback
                kept = what_is_kept(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint else "no checkpoint was saved"
                raise UserError(
                    f"training diverged at epoch {trainer.current_epoch}, step {trainer.global_step}: the epoch's "
                    f"{name} is {value:.3g}, over {self.EXPLODED}x a uniform guess's (is the learning rate too high?); "
                    f"stopped, {kept}"
                )
