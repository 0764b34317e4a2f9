"""Threads that yield to other processes: fewer while others keep cores busy, all of them again after."""

from types import SimpleNamespace

import pytest
import torch

from fmnist_lightning.errors import UserError
from fmnist_lightning.training.threads import FIXED_THREADS_ENV, ThreadsForFreeCores, cpu_usage, fixed_thread_count


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv(FIXED_THREADS_ENV, raising=False)
    before, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)  # a deterministic run keeps its thread count (tested below)
    yield
    torch.set_num_threads(before)
    torch.use_deterministic_algorithms(deterministic)


def test_the_thread_count_follows_the_free_cores_without_flapping(two_threads):
    threads = ThreadsForFreeCores(cores=2)
    assert threads.threads_for(free_cores=1.9) == 2  # alone: both cores
    assert threads.threads_for(free_cores=0.7) == 1  # another process took a core
    torch.set_num_threads(1)
    assert threads.threads_for(free_cores=1.4) == 1  # still busy: no flapping back and forth
    assert threads.threads_for(free_cores=1.95) == 2  # the other process is gone


def test_a_busy_machine_takes_threads_away_and_gives_them_back(two_threads):
    # machine-wide busy seconds, this process's, wall clock: 1.3 cores busy elsewhere, then none
    samples = iter([(0.0, 0.0, 0.0), (2.0, 0.7, 1.0), (4.0, 1.4, 2.0), (5.9, 3.3, 3.0), (7.85, 5.25, 4.0)])
    threads = ThreadsForFreeCores(usage=lambda: next(samples), cores=2)
    cpu_module = SimpleNamespace(device=torch.device("cpu"))
    seen = []
    for _ in range(5):
        threads._next_check = 0.0  # as if a second had passed
        threads.on_train_batch_start(None, cpu_module, None, 0)
        seen.append(torch.get_num_threads())
    assert seen == [2, 1, 1, 2, 2]
    torch.set_num_threads(1)
    threads.teardown(None, cpu_module, "fit")
    assert torch.get_num_threads() == 2  # as it found them


def test_a_fixed_thread_count_is_left_alone(monkeypatch):
    monkeypatch.setenv(FIXED_THREADS_ENV, "2")
    samples = iter([(0.0, 0.0, 0.0), (2.0, 0.0, 1.0)])  # both cores busy elsewhere
    threads = ThreadsForFreeCores(usage=lambda: next(samples), cores=2)
    before = torch.get_num_threads()
    for _ in range(2):
        threads._next_check = 0.0
        threads.on_train_batch_start(None, SimpleNamespace(device=torch.device("cpu")), None, 0)
    assert torch.get_num_threads() == before


def test_cpu_usage_reads_this_machine():
    usage = cpu_usage()
    assert usage is not None  # Linux
    busy, own, now = usage
    assert busy > 0 and own > 0 and now > 0


def test_a_deterministic_run_keeps_its_thread_count_whatever_else_runs(two_threads):
    samples = iter([(0.0, 0.0, 0.0), (2.0, 0.0, 1.0)])  # both cores busy elsewhere
    threads = ThreadsForFreeCores(usage=lambda: next(samples), cores=2)
    torch.use_deterministic_algorithms(True)  # what trainer.deterministic: true does
    for _ in range(2):
        threads._next_check = 0.0
        threads.on_train_batch_start(None, SimpleNamespace(device=torch.device("cpu")), None, 0)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5"])
def test_a_thread_count_that_is_no_count_is_refused_with_one_line(monkeypatch, value):
    monkeypatch.setenv(FIXED_THREADS_ENV, value)
    with pytest.raises(UserError, match=f"OMP_NUM_THREADS={value!r} is not a thread count; set a whole number"):
        fixed_thread_count()
    monkeypatch.setenv(FIXED_THREADS_ENV, " 3")
    assert fixed_thread_count() == 3
