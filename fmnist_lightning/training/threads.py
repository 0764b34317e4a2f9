"""CPU threads for the cores other processes leave free: two processes each spinning all cores' worth of
OpenMP threads wait on each other at every barrier and run many times slower (docs/performance.md).

The thread count changes a run's last digits, so it only adapts where the run asks for no bit-identical
repeats: not with `trainer.deterministic` (then it stays torch's, one per core) nor with OMP_NUM_THREADS set.
"""

import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from fmnist_lightning.errors import UserError

FIXED_THREADS_ENV = "OMP_NUM_THREADS"  # set: the user chose the thread count, nothing adapts
CHECK_SECONDS = 1.0
Usage = tuple[float, float, float]  # (seconds of CPU busy on the whole machine, of this process, wall clock)


def fixed_thread_count() -> int | None:
    """The thread count OMP_NUM_THREADS fixes, None where it is unset; a value that is no count is refused
    (OpenMP and torch would each warn and pick a count of their own)."""
    value = os.environ.get(FIXED_THREADS_ENV)
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(
            f"{FIXED_THREADS_ENV}={value!r} is not a thread count; set a whole number of at least 1 (such as "
            f"{os.cpu_count() or 1}), or unset it to let the threads follow the free cores"
        )
    return int(value)


def cpu_usage() -> Usage | None:
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process, and the time; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as file:
            fields = [int(value) for value in file.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (
        (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
        own.user + own.system,
        time.monotonic(),
    )


class ThreadsForFreeCores(L.Callback):
    """On the CPU, about once a second: as many torch threads as the cores other processes leave free.

    Fewer threads when others keep cores busy, all of them again once they stop. Off, so that a busy machine
    cannot change a number, when the run is deterministic (`trainer.deterministic`, which turns torch's
    deterministic algorithms on) or OMP_NUM_THREADS fixes the count.
    """

    def __init__(self, usage: Callable[[], Usage | None] = cpu_usage, cores: int | None = None) -> None:
        self.usage = usage
        self.cores = cores or os.cpu_count() or 1
        self.max_threads = torch.get_num_threads()
        self._last: Usage | None = None
        self._next_check = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.max_threads = torch.get_num_threads()
        self._last, self._next_check = None, 0.0

    @property
    def adapting(self) -> bool:
        """Whether the count may change: neither fixed by OMP_NUM_THREADS nor frozen by a deterministic run."""
        return fixed_thread_count() is None and not torch.are_deterministic_algorithms_enabled()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.adapting:
            torch.set_num_threads(self.max_threads)

    def _check(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cpu" or not self.adapting or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + CHECK_SECONDS
        sample = self.usage()
        if sample is not None and self._last is not None and sample[2] > self._last[2]:
            busy, own, now = (new - old for new, old in zip(sample, self._last, strict=True))
            threads = self.threads_for(free_cores=self.cores - max(0.0, busy - own) / now)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self._last = sample

    def threads_for(self, free_cores: float) -> int:
        """Fewer threads as soon as a core is taken; more only once clearly free (no flapping)."""
        threads = torch.get_num_threads()
        if free_cores < threads - 0.5:
            return max(1, round(free_cores))
        if free_cores > threads + 0.75:
            return min(self.max_threads, int(free_cores + 0.25))
        return threads

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._check(pl_module)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._check(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._check(pl_module)

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._check(pl_module)
