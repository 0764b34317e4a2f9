"""0.1.0's place of the run log: run folders' config.yaml name `fmnist_lightning.run_log.RunCSVLogger`."""

from fmnist_lightning.training.run_log import RunCSVLogger

__all__ = ["RunCSVLogger"]
