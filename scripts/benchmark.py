"""Speed and memory, side by side in one run: this project's fit against a hand-written loop and a typical port.

Usage: .venv/bin/python scripts/benchmark.py [--epochs 4] [--precision 32-true|bf16-mixed] [--json out.json]
(see --help).

Pipelines, each in a process of its own so that its peak memory is its own:

- `a_same`: this project's fit through the CLI's code path (`configs/base.yaml`: Trainer, DataModule,
  LightningModule, CSV logging, checkpointing), with `b`'s precision, memory format, layer order, Adam
  implementation, eager (not graphed) GPU steps and evaluation batch size;
- `a_default`: the same with `configs/base.yaml`'s own settings, the ones users get;
- `b`: a minimal hand-written PyTorch loop over float tensors held in memory, same network, batch size,
  optimizer, precision and memory format as `a_same`, keeping the same books as the original script
  (training loss and accuracy summed on the device, validation accuracy each epoch);
- `c`: a typical Lightning port: torchvision's dataset with `ToTensor()` per image, a plain DataLoader,
  a LightningModule that logs per step, default Trainer settings.

Every pipeline trains on the same 48,000 / 12,000 split and validates each epoch. An epoch's seconds
cover training and validation (and, for a and c, their logging and checkpointing). Inference is a
pass over the 10,000 test images (for a and c, Lightning's `validate` on the test set). The machine is
shared and noisy (the same loop runs 20-30% faster or slower from one minute to the next), so the
pipelines take turns: all worker processes start and load their data, then each runs a stretch of
`--turn-steps` training steps while the others wait, turn after turn, until every pipeline has finished
its epoch: one round. A pipeline's epoch time leaves out its waits, and since every epoch of a round is
spread over the same minute or two, a slow spell of the machine slows all of them alike. Every ratio is
computed per round; the median over the rounds is reported, with the lowest and highest round beside
it to show how much the noise still moved it. Round 0 is a warm-up.

`--whole-command` measures what a user waits for instead: the original Keras script
(`scripts/keras_original.py`, run by `--keras-python`, a Python with tensorflow-cpu) and `fmnist fit
--config configs/base.yaml [--config configs/RECIPE.yaml] --test_after_fit true` for each of `--recipes`
(base, speedrun, ...) as whole processes, taking turns pair after pair: wall time, CPU time, peak memory,
seconds per epoch and test accuracy, each at the recipe's own number of epochs. `--seeds` gives each pair of
the recipes other than base a seed of its own; `--test-each-epoch` adds the test accuracy after every epoch
against the seconds since launch (`scripts/time_to_accuracy.py` draws it). `--background-load 0 1` repeats that
with that many busy processes (a torch loop on all cores, like another training) beside each command.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from fmnist_lightning.data.batches import in_batches
from fmnist_lightning.data.datamodule import DEFAULT_DATA_DIR, FashionMNISTDataModule, official_test_set
from fmnist_lightning.network import original_cnn
from fmnist_lightning.training.speed import configure_runtime

PIPELINES = ("b", "a_same", "a_default", "c")
KERAS_SCRIPT = Path(__file__).resolve().with_name("keras_original.py")
BUSY_LOOP = "import torch\na = torch.randn(256, 256)\nwhile True:\n    a = (a @ a).tanh_()"
READY, EPOCH, RESULT, CURVE = "BENCHMARK-READY", "BENCHMARK-EPOCH", "BENCHMARK-RESULT", "BENCHMARK-CURVE"
START_ENV = "BENCHMARK_START"  # time.time() when the benchmark launched the command (the curve's zero)
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


class Turns:
    """A worker's side of taking turns: hand the machine over, wait for it back, and keep count of the waits."""

    def __init__(self) -> None:
        self.waited = 0.0  # seconds spent waiting for a turn, in all

    def wait(self) -> None:
        """Tell the orchestrator this worker is ready, and block until it says go (one line on stdin)."""
        start = time.perf_counter()
        print(READY, flush=True)
        if not sys.stdin.readline():
            raise SystemExit("benchmark: orchestrator went away")
        self.waited += time.perf_counter() - start

    def clock(self) -> float:
        """Seconds of this worker's own running: wall time without the waits."""
        return time.perf_counter() - self.waited


TURNS = Turns()


def hand_over(step: int, turn_steps: int, device: torch.device) -> None:
    """Let the next pipeline run after every `turn_steps` training steps of an epoch (0: whole epochs)."""
    if turn_steps and step and step % turn_steps == 0:
        _synchronize(device)  # the stretch's queued GPU work belongs to this turn
        TURNS.wait()


def report_epoch(epoch_seconds: float, train_seconds: float) -> None:
    print(f"{EPOCH} {json.dumps({'epoch_seconds': epoch_seconds, 'train_seconds': train_seconds})}", flush=True)


class EpochTimer(L.Callback):
    """Takes turns with the other pipelines (before each epoch and every `turn_steps` steps of it), and
    reports each epoch's time without the waits.

    An epoch's time covers training, validation and checkpointing; its training part ends where
    validation starts.
    """

    def __init__(self, turn_steps: int) -> None:
        self.turn_steps = turn_steps
        self._epoch_start = self._train_end = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        TURNS.wait()
        self._epoch_start = self._train_end = TURNS.clock()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        hand_over(batch_idx, self.turn_steps, pl_module.device)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._train_end = TURNS.clock()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = TURNS.clock()  # Lightning calls this after the epoch's validation and checkpoint
        report_epoch(end - self._epoch_start, self._train_end - self._epoch_start)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: str, precision: str) -> torch.autocast:
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def run_hand_written_loop(options: argparse.Namespace) -> dict[str, Any]:
    """(b): data as float tensors in memory, a plain loop, nothing else.

    It gets the same process-wide settings as the CLI (`configure_runtime`), so that the comparison is of
    the loops alone; without the allocator's, its speed depends on which temporaries happened to be freed
    first.
    """
    configure_runtime()
    device = torch.device(options.device)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    splits = FashionMNISTDataModule(data_dir=options.data_dir, download=False, data_on_device=False)
    splits.prepare_data()
    splits.setup("fit")
    splits.setup("test")

    def as_floats(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255).to(device).contiguous(memory_format=memory_format)

    train_x, train_y = as_floats(splits.train_set.images), splits.train_set.labels.to(device)
    val_x, val_y = as_floats(splits.val_set.images), splits.val_set.labels.to(device)
    test_x = as_floats(splits.test_set.images)
    network = original_cnn().to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    batch = options.batch_size

    def evaluate(images: torch.Tensor) -> torch.Tensor:
        network.eval()
        with torch.inference_mode(), autocast(device.type, options.precision):
            predictions = torch.cat([network(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
        network.train()
        return predictions

    for _ in range(options.epochs):
        TURNS.wait()
        start = TURNS.clock()
        order = torch.randperm(len(train_x), device=device)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for step, i in enumerate(range(0, len(order), batch)):
            hand_over(step, options.turn_steps, device)
            index = order[i : i + batch]
            with autocast(device.type, options.precision):
                logits = network(train_x[index])
                loss = F.cross_entropy(logits, train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == train_y[index]).sum()
        _synchronize(device)
        train_end = TURNS.clock()
        val_acc = float((evaluate(val_x) == val_y).float().mean())
        report_epoch(TURNS.clock() - start, train_end - start)
    TURNS.wait()
    start = time.perf_counter()
    evaluate(test_x)
    _synchronize(device)
    return _result(len(train_x), time.perf_counter() - start, len(test_x), val_acc)


def run_project_fit(options: argparse.Namespace, same_settings: bool) -> dict[str, Any]:
    """(a): the CLI's own fit on configs/base.yaml; with `same_settings`, b's precision and memory format."""
    from fmnist_lightning.commands.lightning import lightning_command

    with tempfile.TemporaryDirectory(prefix="fmnist-benchmark-") as logs:
        args = [
            "fit",
            "--config", str(BASE_CONFIG),
            "--data.data_dir", options.data_dir,
            "--data.download", "false",
            "--data.batch_size", str(options.batch_size),
            "--trainer.max_epochs", str(options.epochs),
            "--trainer.accelerator", options.device,
            "--trainer.logger.init_args.save_dir", logs,
            # this script is the worker's __main__: the CLI finds the callback there
            "--trainer.callbacks+=__main__.EpochTimer", f"--trainer.callbacks.turn_steps={options.turn_steps}",
        ]  # fmt: skip
        if same_settings:  # b's precision, memory format, layer order, Adam, eager steps, evaluation batch
            args += [
                "--trainer.precision", options.precision,
                "--model.channels_last", str(options.channels_last),
                "--model.pool_before_relu", "false",
                "--model.optimizer.init_args.fused", "false",
                "--model.cuda_graph", "false",
                "--data.eval_batch_size", str(options.batch_size),
            ]  # fmt: skip
        cli = lightning_command(args)
        val_acc = float(cli.trainer.callback_metrics["val_acc"])
        cli.datamodule.setup("test")
        TURNS.wait()
        start = time.perf_counter()
        cli.trainer.validate(cli.model, dataloaders=cli.datamodule.test_dataloader(), verbose=False)
        inference_seconds = time.perf_counter() - start
        test_images = len(cli.datamodule.test_set)
        train_images = len(cli.datamodule.train_set)
    return _result(train_images, inference_seconds, test_images, val_acc)


def run_typical_port(options: argparse.Namespace) -> dict[str, Any]:
    """(c): how such a port usually looks: per-image ToTensor, a plain DataLoader, per-step logging."""
    from torch.utils.data import DataLoader, random_split
    from torchmetrics.functional import accuracy
    from torchvision.datasets import FashionMNIST
    from torchvision.transforms import ToTensor

    from fmnist_lightning.data.datamodule import held_out_count

    class TypicalModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.network = original_cnn()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.network(images)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, labels = batch
            logits = self(images)
            loss = F.cross_entropy(logits, labels)
            self.log("train_loss", loss, prog_bar=True)
            self.log("train_acc", accuracy(logits, labels, task="multiclass", num_classes=10), prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            images, labels = batch
            logits = self(images)
            self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True)
            self.log("val_acc", accuracy(logits, labels, task="multiclass", num_classes=10), prog_bar=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    full = FashionMNIST(options.data_dir, train=True, transform=ToTensor())
    val_count = held_out_count(len(full), 0.2)
    train, val = random_split(full, [len(full) - val_count, val_count], generator=torch.Generator().manual_seed(42))
    test = FashionMNIST(options.data_dir, train=False, transform=ToTensor())
    timer = EpochTimer(options.turn_steps)
    with tempfile.TemporaryDirectory(prefix="fmnist-benchmark-") as logs:
        trainer = L.Trainer(
            max_epochs=options.epochs, accelerator=options.device, default_root_dir=logs, callbacks=[timer]
        )
        model = TypicalModel()
        trainer.fit(
            model,
            DataLoader(train, batch_size=options.batch_size, shuffle=True),
            DataLoader(val, batch_size=options.batch_size),
        )
        val_acc = float(trainer.callback_metrics["val_acc"])
        TURNS.wait()
        start = time.perf_counter()
        trainer.validate(model, DataLoader(test, batch_size=options.batch_size), verbose=False)
        inference_seconds = time.perf_counter() - start
    return _result(len(train), inference_seconds, len(test), val_acc)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(train_images: int, inference_seconds: float, test_images: int, val_acc: float) -> dict[str, Any]:
    return {
        "train_images": train_images,
        "inference_images_per_second": test_images / inference_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "last_val_acc": val_acc,
    }


class EpochClock(L.Callback):
    """Prints each epoch's seconds (training, validation, checkpoint) for `--whole-command`."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report_epoch(time.perf_counter() - self._start, time.perf_counter() - self._start)


class TestEachEpoch(L.Callback):
    """`--test-each-epoch`: the test accuracy after each epoch against the seconds since the benchmark launched
    the command, for the time-to-accuracy curve. The extra test passes are measurement: their own seconds are
    left out of the clock, and they touch nothing training reads (eval mode, no gradients, no random numbers)."""

    def __init__(self) -> None:
        self.measuring = 0.0
        self.test_set: Any = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.time() - float(os.environ[START_ENV]) - self.measuring
        start = time.perf_counter()
        if self.test_set is None:
            self.test_set = official_test_set(trainer.datamodule.data_dir)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            predicted = in_batches(
                lambda images: pl_module(images.to(pl_module.device)).argmax(1), self.test_set.images
            )
        pl_module.train(was_training)
        accuracy = (predicted.cpu() == self.test_set.labels).float().mean().item()
        self.measuring += time.perf_counter() - start
        print(f"{CURVE} {json.dumps({'seconds': elapsed, 'test_acc': accuracy})}", flush=True)


def whole_commands(options: argparse.Namespace, logs: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The command lines (and environments) of the original script and of `fmnist fit` with each recipe
    (`configs/base.yaml`, then `configs/RECIPE.yaml` on top of it): the README's main command and the speed run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    commands = {}
    if options.keras_python and Path(options.keras_python).exists():
        keras = [options.keras_python, str(KERAS_SCRIPT), "--data-dir", options.data_dir]
        keras += ["--epochs", str(options.epochs or 10)] + (["--test-each-epoch"] if options.test_each_epoch else [])
        commands["keras"] = (keras, dict(os.environ))
    else:
        print(f"benchmark: no Keras reference ({options.keras_python} not found); see scripts/keras_original.py")
    for recipe in options.recipes:
        configs = ["--config", str(BASE_CONFIG)]
        if recipe != "base":
            configs += ["--config", str(BASE_CONFIG.with_name(f"{recipe}.yaml"))]
        fmnist = [
            sys.executable, "-m", "fmnist_lightning", "fit", *configs, "--test_after_fit", "true",
            "--data.data_dir", options.data_dir, "--trainer.logger.init_args.save_dir", logs,
            "--trainer.callbacks+=benchmark.EpochClock",
        ]  # fmt: skip
        if options.epochs:
            fmnist += ["--trainer.max_epochs", str(options.epochs)]
        if options.test_each_epoch:
            fmnist.append("--trainer.callbacks+=benchmark.TestEachEpoch")
        commands[recipe] = (fmnist, env)
    return commands


def timed_process(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one command to its end: wall and CPU seconds, peak memory, its epochs and test accuracy (and, with
    `--test-each-epoch`, its time-to-accuracy curve)."""
    start = time.perf_counter()
    env = {**env, START_ENV: repr(time.time())}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (wait status {status}):\n{output[-2000:]}")
    epochs = [json.loads(line.split(EPOCH, 1)[1]) for line in output.splitlines() if EPOCH in line]
    accuracy = next(
        (line.split("accuracy ")[1].split(",")[0] for line in output.splitlines() if line.startswith("test:")), None
    )
    if RESULT in output:
        accuracy = json.loads(output.split(RESULT, 1)[1].splitlines()[0])["test_acc"]
    return {
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "epoch_seconds": statistics.median(epoch["epoch_seconds"] for epoch in epochs),
        "test_acc": float(accuracy),
        "curve": [json.loads(line.split(CURVE, 1)[1]) for line in output.splitlines() if CURVE in line],
    }


def seeded(name: str, command: list[str], options: argparse.Namespace, pair: int) -> list[str]:
    """`--seeds`: pair i of a recipe other than base runs with the i-th seed; the base recipe keeps its
    config's seed, so its numbers stay the reference ones."""
    if not options.seeds or name in ("keras", "base"):
        return command
    return [*command, "--seed_everything", str(options.seeds[pair])]


def run_whole_commands(options: argparse.Namespace) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """For each background load: the commands in turns, `--pairs` times; results[load][command] = runs."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="fmnist-benchmark-") as logs:
        commands = whole_commands(options, logs)
        for load in options.background_load:
            results[str(load)] = {name: [] for name in commands}
            for pair in range(options.pairs):
                for name, (command, env) in commands.items():
                    print(f"benchmark: load {load}, pair {pair}, {name} ...", file=sys.stderr, flush=True)
                    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(load)]
                    try:
                        run = timed_process(seeded(name, command, options, pair), env)
                        results[str(load)][name].append(run)
                    finally:
                        for process in busy:
                            process.kill()
                            process.wait()
    return results


def whole_command_report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Medians with the lowest-highest run beside them; ratios taken pair by pair."""

    def spread(values: list[float], digits: int = 1) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    lines = [
        "| background load | command | whole command s | CPU s | peak RSS MB | s / epoch | test accuracy |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for load, commands in results.items():
        for name, runs in commands.items():
            column = {key: [run[key] for run in runs] for key in runs[0]}
            lines.append(
                f"| {load} | {name} | {spread(column['wall_seconds'])} | {spread(column['cpu_seconds'])} | "
                f"{statistics.median(column['peak_rss_mb']):,.0f} | {spread(column['epoch_seconds'], 2)} | "
                f"{spread(column['test_acc'], 4)} |"
            )
    lines += ["", "| ratio | median (lowest-highest pair) |", "|---|---:|"]
    for load, commands in results.items():
        if "keras" not in commands:
            continue
        for recipe in (name for name in commands if name != "keras"):
            for key, label in (("wall_seconds", "whole command"), ("epoch_seconds", "s / epoch")):
                pairs = [
                    ours[key] / theirs[key] for ours, theirs in zip(commands[recipe], commands["keras"], strict=True)
                ]
                lines.append(f"| fmnist {recipe} / keras, {label}, load {load} | {spread(pairs, 3)} |")
    if "0" in results:
        for load in (load for load in results if load != "0"):
            for name in results[load]:
                alone = statistics.median(run["epoch_seconds"] for run in results["0"][name])
                loaded = [run["epoch_seconds"] / alone for run in results[load][name]]
                lines.append(f"| {name} s / epoch, load {load} / load 0 | {spread(loaded, 2)} |")
    return "\n".join(lines)


WORKERS = {
    "b": run_hand_written_loop,
    "a_same": lambda options: run_project_fit(options, same_settings=True),
    "a_default": lambda options: run_project_fit(options, same_settings=False),
    "c": run_typical_port,
}


class Worker:
    """One pipeline in its own process, driven turn by turn over its stdin/stdout."""

    def __init__(self, name: str, options: argparse.Namespace) -> None:
        self.name = name
        # stderr goes to a file (a pipe nobody reads would fill up and block the worker); closed in finish()
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *_shared_flags(options)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.epochs: list[dict[str, float]] = []

    def _lines(self) -> Iterator[str]:
        """The worker's output lines; an error with its log if it stops before it should."""
        # Through readline, not `yield from` the file: closing a generator closes what it delegates to, the pipe.
        yield from iter(self.process.stdout.readline, "")
        self.log.seek(0)
        raise RuntimeError(f"pipeline {self.name} stopped ({self.process.wait()}):\n{self.log.read()[-3000:]}")

    def _read_until(self, marker: str) -> str:
        # a progress bar may precede the marker on the same line
        return next(line.split(marker, 1)[1].strip() for line in self._lines() if marker in line)

    def ready(self) -> None:
        self._read_until(READY)

    def run_turn(self) -> bool:
        """Let the worker run until it hands over again; whether it finished an epoch in that turn."""
        self.process.stdin.write("go\n")
        epochs_before = len(self.epochs)
        for line in self._lines():
            if EPOCH in line:
                self.epochs.append(json.loads(line.split(EPOCH, 1)[1]))
            elif READY in line:
                break
        return len(self.epochs) > epochs_before

    def finish(self) -> dict[str, Any]:
        self.process.stdin.write("go\n")
        result = json.loads(self._read_until(RESULT))
        self.process.wait()
        self.log.close()
        return {**result, "epochs": self.epochs}


def run_in_turns(options: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Start every pipeline, then let them take turns until each has run one more epoch, round after round."""
    workers = [Worker(name, options) for name in options.pipelines]
    for worker in workers:
        worker.ready()
    for round_number in range(options.epochs):
        print(f"benchmark: round {round_number} of {options.epochs} ...", file=sys.stderr, flush=True)
        running = workers
        while running:
            running = [worker for worker in running if not worker.run_turn()]
    return {worker.name: worker.finish() for worker in workers}


def _shared_flags(options: argparse.Namespace) -> list[str]:
    flags = [
        "--data-dir", options.data_dir,
        "--epochs", str(options.epochs),
        "--batch-size", str(options.batch_size),
        "--device", options.device,
        "--precision", options.precision,
        "--turn-steps", str(options.turn_steps),
    ]  # fmt: skip
    if options.threads:
        flags += ["--threads", str(options.threads)]
    if not options.channels_last:
        flags.append("--no-channels-last")
    return flags


RATIOS = {
    "a_same / b (epoch time, same settings)": ("a_same", "b"),
    "a_default / b (epoch time)": ("a_default", "b"),
    "c / a_default (epoch time)": ("c", "a_default"),
}


def round_ratios(results: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Each epoch-time ratio, round by round (the two epochs ran seconds apart), warm-up round left out."""
    return {
        label: _measured(
            [
                top["epoch_seconds"] / bottom["epoch_seconds"]
                for top, bottom in zip(results[numerator]["epochs"], results[denominator]["epochs"], strict=True)
            ]
        )
        for label, (numerator, denominator) in RATIOS.items()
        if {numerator, denominator} <= results.keys()
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The median of each epoch-time ratio over the rounds; and peak memory."""
    found = {label: statistics.median(values) for label, values in round_ratios(results).items()}
    if {"a_default", "b"} <= results.keys():
        found["a_default / b (peak memory)"] = results["a_default"]["peak_rss_mb"] / results["b"]["peak_rss_mb"]
    return found


def _measured(values: list[Any]) -> list[Any]:
    """Round 0 is a warm-up, unless it is the only one."""
    return values[1:] if len(values) > 1 else values


def summary(result: dict[str, Any]) -> dict[str, float]:
    epochs = _measured(result["epochs"])
    return {
        "epoch_seconds": statistics.median(epoch["epoch_seconds"] for epoch in epochs),
        "train_images_per_second": statistics.median(result["train_images"] / e["train_seconds"] for e in epochs),
    }


def report(results: dict[str, dict[str, Any]], options: argparse.Namespace) -> str:
    settings = (
        f"batch {options.batch_size}, {options.epochs} rounds of one epoch per pipeline (the first a warm-up), "
        f"in turns of {f'{options.turn_steps} steps' if options.turn_steps else 'whole epochs'}, "
        f"device {options.device}, "
        f"b and a_same in {options.precision} {'channels_last' if options.channels_last else 'NCHW'}, "
        f"{torch.get_num_threads() if not options.threads else options.threads} threads"
    )
    lines = [
        f"Settings: {settings}",
        "",
        "| pipeline | s / epoch | train img/s | test inference img/s | peak RSS MB | last val acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        medians = summary(result)
        lines.append(
            f"| {name} | {medians['epoch_seconds']:.2f} | {medians['train_images_per_second']:,.0f} | "
            f"{result['inference_images_per_second']:,.0f} | {result['peak_rss_mb']:,.0f} | "
            f"{result['last_val_acc']:.4f} |"
        )
    # The spread over the rounds shows how much the machine's noise moved each ratio during this run.
    spreads = {label: f"{min(values):.3f}-{max(values):.3f}" for label, values in round_ratios(results).items()}
    lines += ["", "| ratio | value | lowest-highest round |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.3f} | {spreads.get(name, '')} |" for name, value in ratios(results).items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="data folder (real Fashion-MNIST)")
    parser.add_argument(
        "--epochs",
        type=int,
        help="epochs (rounds of turns) per pipeline, the first a warm-up (default 6); --whole-command: instead of "
        "each recipe's own and the original's 10",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"), help="for b and a_same")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="b and a_same in NCHW")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument(
        "--turn-steps",
        type=int,
        default=50,
        help="training steps a pipeline runs before the next one's turn (0: a whole epoch per turn)",
    )
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--json", help="also write the results and ratios to this JSON file")
    parser.add_argument(
        "--whole-command", action="store_true", help="time the original Keras script and fmnist fit as whole processes"
    )
    parser.add_argument("--keras-python", default=".venv-keras/bin/python", help="a Python with tensorflow-cpu")
    parser.add_argument("--pairs", type=int, default=2, help="--whole-command: turns per command and load")
    parser.add_argument(
        "--background-load", type=int, nargs="+", default=[0], help="--whole-command: busy processes beside each run"
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["base"],
        help="--whole-command: fmnist recipes to time, base or a configs/NAME.yaml on top of it (e.g. speedrun)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="--whole-command: one seed per pair for the recipes other than base"
    )
    parser.add_argument(
        "--test-each-epoch", action="store_true", help="--whole-command: test accuracy after each epoch (a curve)"
    )
    parser.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for recipe in options.recipes:
        if recipe != "base" and not BASE_CONFIG.with_name(f"{recipe}.yaml").is_file():
            parser.error(f"--recipes {recipe}: no configs/{recipe}.yaml; name base or a file in configs/")
    if options.seeds:
        options.pairs = len(options.seeds)
    if options.epochs is None and not options.whole_command:
        options.epochs = 6
    if options.turn_steps < 0:
        parser.error(f"--turn-steps takes 0 (whole epochs) or a number of steps, got {options.turn_steps}")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.worker:
        print(f"{RESULT} {json.dumps(WORKERS[options.worker](options))}", flush=True)
        return
    if options.whole_command:
        whole = run_whole_commands(options)
        print(whole_command_report(whole))
        if options.json:
            Path(options.json).write_text(json.dumps({"whole_command": whole}, indent=2) + "\n")
        return
    results = run_in_turns(options)
    print(report(results, options))
    if options.json:
        written = {"results": results, "ratios": ratios(results), "round_ratios": round_ratios(results)}
        Path(options.json).write_text(json.dumps(written, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
