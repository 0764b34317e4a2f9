"""CPU threads for the cores other processes leave free: two processes each spinning all cores' worth of
OpenMP threads wait on each other at every barrier and run many times slower (docs/performance.md)."""

import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

FIXED_THREADS_ENV = "OMP_NUM_THREADS"  # set: the user chose the thread count, nothing adapts
CHECK_SECONDS = 1.0
Usage = tuple[float, float, float]  # (seconds of CPU busy on the whole machine, of this process, wall clock)


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

    Fewer threads when others keep cores busy, all of them again once they stop. Set OMP_NUM_THREADS to
    fix the count: the thread count changes a run's last digits, so a busy machine otherwise breaks
    bit-identical repeats.
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

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if FIXED_THREADS_ENV not in os.environ:
            torch.set_num_threads(self.max_threads)

    def _check(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cpu" or FIXED_THREADS_ENV in os.environ or time.monotonic() < self._next_check:
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
