"""Interrupted runs resume exactly, runs are reproducible, DDP shards and syncs, bad input changes nothing."""

import csv
import json
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from fmnist_lightning.checkpoints import SafeCheckpointIO, load_checkpoint
from fmnist_lightning.errors import UserError
from fmnist_lightning.run_log import MergingExperimentWriter
from fmnist_lightning.sources import raw_folder
from helpers import (
    BASE_CONFIG,
    REPO,
    cli_environment,
    read_metrics,
    run_cli,
    start_cli,
    tiny_fit_args,
    tree_snapshot,
    wait_for,
)

EPOCHS = 4
STEPS_PER_EPOCH = 10  # 320 tiny training images, batch 32


def fit_args(data_dir, *extra: str, slow: float | None = None) -> list[str]:
    """The base recipe on the tiny data, with an extra checkpoint every 3 steps (so kills land mid-epoch)."""
    args = [
        "fit",
        *tiny_fit_args(data_dir, epochs=EPOCHS),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks.save_last=true",
    ]
    if slow:
        args += ["--trainer.callbacks+=helpers.SlowSteps", f"--trainer.callbacks.seconds={slow}"]
    return [*args, *extra]


def outcome(run_dir):
    """What must be identical between two runs: every logged value, and the final weights."""
    rows = sorted(tuple(sorted((k, v) for k, v in row.items() if v != "")) for row in read_metrics(run_dir))
    weights = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return rows, weights


def assert_same_outcome(run_a, run_b):
    rows_a, weights_a = outcome(run_a)
    rows_b, weights_b = outcome(run_b)
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def epochs_logged(run_dir) -> list[str]:
    return [row["epoch"] for row in read_metrics(run_dir) if row.get("val_acc")]


def test_the_run_log_continues_its_file_and_a_relogged_epoch_or_step_replaces_its_row(tmp_path):
    first = MergingExperimentWriter(str(tmp_path))
    first.log_metrics({"train_loss": 0.9, "epoch": 0}, step=9)
    first.log_metrics({"val_acc": 0.5, "epoch": 0}, step=9)
    first.log_metrics({"lr-Adam": 0.001}, step=5)
    first.save()
    resumed = MergingExperimentWriter(str(tmp_path))  # a new process continuing the same run folder
    resumed.log_metrics({"val_acc": 0.6, "epoch": 0}, step=9)  # epoch 0 validated again after a resume
    resumed.log_metrics({"lr-Adam": 0.002}, step=5)
    resumed.log_metrics({"val_acc": 0.7, "epoch": 1}, step=19)
    resumed.save()
    rows = read_metrics(tmp_path)
    assert [(row["epoch"], row["val_acc"]) for row in rows if row.get("val_acc")] == [("0", "0.6"), ("1", "0.7")]
    assert [row["train_loss"] for row in rows if row.get("train_loss")] == ["0.9"]
    assert [row["lr-Adam"] for row in rows if row.get("lr-Adam")] == ["0.002"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_cli(*fit_args(tiny_data_dir), cwd=workdir)
    return workdir / "runs" / "base" / "version_0"


def test_same_config_and_seed_twice_gives_identical_logs_and_weights(uninterrupted, tiny_data_dir, tmp_path):
    run_cli(*fit_args(tiny_data_dir), cwd=tmp_path)
    assert_same_outcome(uninterrupted, tmp_path / "runs" / "base" / "version_0")
    assert epochs_logged(uninterrupted) == ["0", "1", "2", "3"]


def test_last_ckpt_holds_the_last_epoch_even_when_it_is_not_the_best(tiny_data_dir, tmp_path):
    # Lightning 2.6's save_last alone rewrites last.ckpt only at a new best epoch (KeepLastCheckpoint);
    # the tiny data's validation accuracy stops improving after a few epochs
    epochs = 8
    run_cli("fit", *tiny_fit_args(tiny_data_dir, epochs=epochs), cwd=tmp_path)
    checkpoints = tmp_path / "runs" / "base" / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    assert sorted(path.name for path in checkpoints.iterdir()) == [best.name, "last.ckpt"]  # no last-v1.ckpt
    assert load_checkpoint(best)["epoch"] < epochs - 1  # the last epoch is not the best
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (epochs - 1, epochs * STEPS_PER_EPOCH)


def kill_during_epoch_1(process, run_dir, sig) -> None:
    """Wait until epoch 1 is under way (epoch 0 validated, a step checkpoint of epoch 1 saved), then signal."""
    metrics = run_dir / "metrics.csv"
    last = run_dir / "checkpoints" / "last.ckpt"

    def in_epoch_1() -> bool:
        if not (metrics.is_file() and last.is_file() and "0" in epochs_logged(run_dir)):
            return False
        return load_checkpoint(last)["global_step"] > STEPS_PER_EPOCH

    wait_for(in_epoch_1, what="epoch 1 to start")
    process.send_signal(sig)
    process.wait(timeout=120)


def resume(data_dir, workdir):
    return run_cli(*fit_args(data_dir, "--ckpt_path", "last"), cwd=workdir)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(uninterrupted, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "runs" / "base" / "version_0"
    process = start_cli(*fit_args(tiny_data_dir, slow=0.05), cwd=tmp_path)
    kill_during_epoch_1(process, run_dir, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < interrupted_at < EPOCHS * STEPS_PER_EPOCH

    result = resume(tiny_data_dir, tmp_path)
    assert "run folder:       runs/base/version_0" in result.stdout  # the same run continued
    assert not (tmp_path / "runs" / "base" / "version_1").exists()
    assert epochs_logged(run_dir) == ["0", "1", "2", "3"]  # no duplicate epochs
    assert_same_outcome(uninterrupted, run_dir)


def test_sigterm_saves_then_exits_cleanly_and_the_resume_is_exact(uninterrupted, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "runs" / "base" / "version_0"
    process = start_cli(*fit_args(tiny_data_dir, slow=0.05), cwd=tmp_path)
    kill_during_epoch_1(process, run_dir, signal.SIGTERM)
    output = process.stdout.read()
    assert process.returncode == 0
    assert "received SIGTERM: saved runs/base/version_0/checkpoints/last.ckpt" in output
    saved_at = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert saved_at % 3 != 0 or saved_at % STEPS_PER_EPOCH != 0  # saved where it stopped, not at a scheduled save

    resume(tiny_data_dir, tmp_path)
    assert epochs_logged(run_dir) == ["0", "1", "2", "3"]
    assert_same_outcome(uninterrupted, run_dir)


def test_a_kill_during_a_checkpoint_write_never_corrupts_last_ckpt(uninterrupted, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "runs" / "base" / "version_0"
    marker = tmp_path / "stalled"
    plugin = {"class_path": "helpers.StallingCheckpointIO", "init_args": {"stall_on_save": 6, "marker": str(marker)}}
    process = start_cli(*fit_args(tiny_data_dir, f"--trainer.plugins=[{json.dumps(plugin)}]"), cwd=tmp_path)
    wait_for(marker.is_file, what="the stalled checkpoint write")
    process.kill()
    process.wait(timeout=60)
    checkpoints = run_dir / "checkpoints"
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] > 0  # the previous one, complete
    partial = [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1  # the half-written file never took the final name
    resume(tiny_data_dir, tmp_path)
    assert_same_outcome(uninterrupted, run_dir)


def test_ddp_on_two_cpu_processes_shards_syncs_and_saves_once(tiny_data_dir, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    result = run_cli(
        "fit",
        *tiny_fit_args(tiny_data_dir, epochs=2),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.callbacks+=helpers.RecordTrainImages",
        f"--trainer.callbacks.folder={seen}",
        "--test_after_fit=true",  # the test phase and its report under DDP too (it once deadlocked there)
        cwd=tmp_path,
        timeout=600,
    )
    rank0, rank1 = (set(json.loads((seen / f"rank{r}.json").read_text())) for r in (0, 1))
    assert len(rank0) == len(rank1) == 160  # each process trains on half of the 320 images
    assert not rank0 & rank1  # disjoint shards

    run_dir = tmp_path / "runs" / "base" / "version_0"
    assert epochs_logged(run_dir) == ["0", "1"]  # logged once, by rank 0
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # best + last, written once
    assert not list(tmp_path.glob("runs/base/version_1"))

    # val_acc is over all 80 validation images, not one process's 40: recompute it from the weights
    from fmnist_lightning.checkpoints import model_from_checkpoint
    from fmnist_lightning.data import FashionMNISTDataModule

    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    dm = FashionMNISTDataModule(data_dir=str(tiny_data_dir), download=False)
    dm.setup("fit")
    with torch.no_grad():
        accuracy = (model(dm.val_set.images).argmax(1) == dm.val_set.labels).float().mean().item()
    logged = float([row for row in read_metrics(run_dir) if row.get("val_acc")][-1]["val_acc"])
    assert logged == pytest.approx(accuracy, abs=1e-6)
    assert "run folder:       runs/base/version_0" in result.stdout

    # the test after fit covers all 100 test images (50 per process) once, in the metrics and the report
    best, _ = model_from_checkpoint(next((run_dir / "checkpoints").glob("best-*.ckpt")))
    dm.setup("test")
    with torch.no_grad():
        predicted = best(dm.test_set.images).argmax(1)
    test_acc = float([row for row in read_metrics(run_dir) if row.get("test_acc")][-1]["test_acc"])
    assert test_acc == pytest.approx((predicted == dm.test_set.labels).float().mean().item(), abs=1e-6)
    with open(run_dir / "confusion_matrix.csv", newline="") as file:
        counts = [int(cell) for row in list(csv.reader(file))[1:] for cell in row[1:]]
    assert sum(counts) == len(dm.test_set) == 100


# ---- bad input: one line, exit 2, nothing that was on disk changed ----------------------------------


@pytest.fixture(scope="module")
def workspace(tiny_data_dir, tmp_path_factory):
    """A folder with its own copy of the data and one finished 2-epoch run."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_data_dir, root / "data")
    run_cli("fit", *tiny_fit_args(root / "data", epochs=2), cwd=root)
    return root


def corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes(b"\x00\x00\x09\x03" + data[4:] if how == "magic" else data[: len(data) // 3])


def broken_yaml(root):
    (root / "broken.yaml").write_text("trainer: {max_epochs: [\n")
    return ["fit", "--config", str(root / "broken.yaml")]


def data_args(root):
    return ["fit", *tiny_fit_args(root / "data", epochs=3)]


def missing_data_args(root):
    no_data = ["--data.data_dir", str(root / "empty"), "--data.system_dir", str(root / "none")]
    return ["fit", "--config", str(BASE_CONFIG), *no_data, "--data.download", "false"]


def resume_args(root, *extra):
    return [*data_args(root), "--ckpt_path", "last", *extra]


BAD_INPUT = {
    "unknown config key": (lambda root: [*data_args(root), "--model.dropuot", "0.5"], "--model.dropuot"),
    "wrong type": (lambda root: [*data_args(root), "--trainer.max_epochs", "ten"], "trainer.max_epochs"),
    "missing config file": (lambda root: ["fit", "--config", str(root / "nope.yaml")], "File does not exist"),
    "config not YAML": (broken_yaml, "Problems parsing config"),
    "batch size 0": (lambda root: [*data_args(root), "--data.batch_size", "0"], "batch_size must be at least 1"),
    "negative batch size": (lambda root: [*data_args(root), "--data.batch_size=-8"], "batch_size must be at least 1"),
    "val size too large": (
        lambda root: [*data_args(root), "--data.val_size", "1000"],
        "data.val_size=1000 asks for 1,000 of the 400",
    ),
    "data missing": (missing_data_args, "Fashion-MNIST not found"),
    "corrupted IDX file": (
        lambda root: (corrupt(raw_folder(root / "data") / "train-images-idx3-ubyte", "magic"), data_args(root))[1],
        "bad magic number",
    ),
    "truncated IDX file": (
        lambda root: (corrupt(raw_folder(root / "data") / "t10k-labels-idx1-ubyte", "cut"), data_args(root))[1],
        "is truncated",
    ),
    "checkpoint missing": (lambda root: [*data_args(root), "--ckpt_path", str(root / "no.ckpt")], "does not exist"),
    "checkpoint truncated": (
        lambda root: (corrupt(root / "runs/base/version_0/checkpoints/last.ckpt", "cut"), resume_args(root))[1],
        "is not a readable checkpoint",
    ),
    "checkpoint of another model": (
        lambda root: (
            torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, root / "other.ckpt"),
            [*data_args(root), "--ckpt_path", str(root / "other.ckpt")],
        )[1],
        "belongs to another model",
    ),
    "output folder not writable": (
        lambda root: (
            (root / "a-file").write_text("x"),
            [*data_args(root), "--trainer.logger.init_args.save_dir", str(root / "a-file" / "runs")],
        )[1],
        "cannot write to the output folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workspace, tmp_path, case):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    make_args, message = BAD_INPUT[case]
    args = make_args(root)
    before = tree_snapshot(root)
    result = run_cli(*args, cwd=root, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("fmnist: error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert tree_snapshot(root) == before


def resumed_run_changes(root, before):
    """Files a failed resume changed: only the run's own logs may have grown, never a checkpoint or data."""
    after = tree_snapshot(root)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert not [name for name in changed if name.endswith(".ckpt") or name.startswith("data/")], changed
    return changed


def test_a_diverging_run_stops_before_saving_nan_weights(workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    before = tree_snapshot(root)
    result = run_cli(*data_args(root), "--model.optimizer.init_args.lr", "1e30", cwd=root, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "training diverged at epoch 0" in last and "is the learning rate too high?" in last
    assert "no checkpoint was saved" in last
    assert not list((root / "runs" / "base" / "version_1" / "checkpoints").glob("*.ckpt"))
    resumed_run_changes(root, before)  # the earlier run and the data are untouched


def test_nan_weights_never_replace_a_good_checkpoint(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "global_step": 40}, path)
    good = path.read_bytes()
    with pytest.raises(UserError, match=r"training diverged at epoch 4, step 50: w is no longer finite") as error:
        io.save_checkpoint(
            {"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 4, "global_step": 50}, path
        )
    assert f"{path} still holds the last good state" in str(error.value)
    assert path.read_bytes() == good


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    before = tree_snapshot(root)

    def small_disk():  # writing past 200 kB fails with EFBIG, like a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(
        [sys.executable, "-m", "fmnist_lightning", *resume_args(root)],
        cwd=root,
        env=cli_environment(),
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot save checkpoint" in last and "(disk full?); stopped" in last
    # the file that failed is last.ckpt (kept as it was) or a new best-*.ckpt (the earlier files are named)
    assert re.search(r"still holds the last good state|saved before \(.*last\.ckpt\) are unchanged", last), last
    changed = resumed_run_changes(root, before)
    assert not [name for name in changed if name.endswith(".tmp")]


def test_debug_variable_shows_the_traceback(workspace, tmp_path):
    env = {**cli_environment(), "FMNIST_DEBUG": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fmnist_lightning", *data_args(workspace), "--data.batch_size", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert str(REPO) in result.stderr or "fmnist_lightning" in result.stderr
