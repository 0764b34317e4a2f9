"""Whole batches cut from in-memory tensors, with the loader pieces Lightning needs to shard and resume them.

The DataLoader asks for a whole batch of indices at once (`__getitems__`): no per-sample work, no collation.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatchDataset(Dataset[Batch]):
    """Images and labels held as two tensors; indexing with a list of indices returns a whole batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices)
        if self.labels.is_cuda:
            # A pinned copy is queued behind the GPU's work; a plain one would make the host wait for it.
            index = index.pin_memory().to(self.labels.device, non_blocking=True)
        else:
            index = index.to(self.labels.device)
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> "TensorBatchDataset":
        """The same split on `device`: one copy of the whole split, not one per batch."""
        return TensorBatchDataset(self.images.to(device), self.labels.to(device))


INFERENCE_BATCH = 1000  # images per forward pass when a whole split is scored outside the Trainer


def in_batches(function: Callable[[Any], Any], inputs: Any, batch_size: int = INFERENCE_BATCH) -> Any:
    """`function` over `inputs` a batch at a time, the results joined: torch tensors or numpy arrays."""
    parts = [function(inputs[start : start + batch_size]) for start in range(0, len(inputs), batch_size)]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def already_collated(batch: Batch) -> Batch:
    """`collate_fn` for a dataset that returns whole batches."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed epoch replays the same order."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every training epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.length, generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    A run resumed mid-epoch skips the batches already trained on, so it sees what an uninterrupted run would.
    """

    _batches_done = 0
    _batches_to_skip = 0

    def __iter__(self) -> Iterator[Batch]:
        batches = super().__iter__()
        self._batches_done = 0
        skip, self._batches_to_skip = self._batches_to_skip, 0
        for _ in range(skip):
            next(batches)
            self._batches_done += 1
        for batch in batches:
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # A finished epoch is saved as 0, so a restart begins the next epoch at its first batch.
        return {"batches_done": self._batches_done % len(self)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._batches_to_skip = state_dict["batches_done"]
