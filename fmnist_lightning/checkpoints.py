"""0.1.0's place of the checkpoint I/O: run folders' config.yaml name
`fmnist_lightning.checkpoints.SafeCheckpointIO`."""

from fmnist_lightning.training.checkpoints import SafeCheckpointIO

__all__ = ["SafeCheckpointIO"]
