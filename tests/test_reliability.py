"""Interrupted runs resume exactly, runs are reproducible, DDP shards and syncs, bad input changes nothing."""

import csv
import json
import shutil
import signal

import pytest
import torch

from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.training.checkpoints import load_checkpoint
from fmnist_lightning.training.run_log import MergingExperimentWriter
from helpers import (
    read_metrics,
    run_cli,
    run_main,
    start_cli,
    tiny_fit_args,
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
    run_cli(*fit_args(tiny_data_dir), cwd=workdir)  # its own process, like the runs it is compared with
    return workdir / "runs" / "base" / "version_0"


def test_same_config_and_seed_twice_gives_identical_logs_and_weights(uninterrupted, tiny_data_dir, tmp_path):
    run_main(*fit_args(tiny_data_dir), cwd=tmp_path)  # in this process: the outcome does not depend on the process
    assert_same_outcome(uninterrupted, tmp_path / "runs" / "base" / "version_0")
    assert epochs_logged(uninterrupted) == ["0", "1", "2", "3"]


def test_last_ckpt_holds_the_last_epoch_even_when_it_is_not_the_best(tiny_data_dir, tmp_path):
    # Lightning 2.6's save_last alone rewrites last.ckpt only at a new best epoch (KeepLastCheckpoint);
    # the tiny data's validation accuracy stops improving after a few epochs
    epochs = 8
    run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=epochs), cwd=tmp_path)
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


RUN = "runs/base/version_0"
RESUME_HINT = f"resume with `fmnist fit --config {RUN}/config.yaml --ckpt_path {RUN}/checkpoints/last.ckpt`"


@pytest.mark.parametrize(
    ("sig", "status", "message"),
    [
        (signal.SIGTERM, 143, f"received SIGTERM: saved runs/base/version_0/checkpoints/last.ckpt; {RESUME_HINT}"),
        pytest.param(  # the same save path as SIGTERM's; in the full suite only, to keep the fast one under 2 min
            signal.SIGINT,
            130,
            f"interrupted (Ctrl-C): saved runs/base/version_0/checkpoints/last.ckpt; {RESUME_HINT}",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_sigterm_and_ctrl_c_save_where_they_stopped_and_the_resume_is_exact(
    uninterrupted, tiny_data_dir, tmp_path, sig, status, message
):
    run_dir = tmp_path / "runs" / "base" / "version_0"
    process = start_cli(*fit_args(tiny_data_dir, slow=0.05), cwd=tmp_path)
    kill_during_epoch_1(process, run_dir, sig)
    output = process.stdout.read()
    assert process.returncode == status  # 128 + the signal, as shells report a command a signal stopped
    assert message in output
    if sig == signal.SIGINT:
        assert "Received SIGTERM" not in output  # Lightning's SIGTERM stop is used, but the user pressed Ctrl-C
    saved_at = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert saved_at % 3 != 0 or saved_at % STEPS_PER_EPOCH != 0  # saved where it stopped, not at a scheduled save

    resume(tiny_data_dir, tmp_path)
    assert epochs_logged(run_dir) == ["0", "1", "2", "3"]
    assert_same_outcome(uninterrupted, run_dir)


@pytest.mark.parametrize("how", ["copied run folder", "absolute save_dir"])
def test_a_resumed_run_keeps_writing_its_own_last_ckpt_however_it_was_reached(workspace, tmp_path, how):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    runs = root / "runs" / "base"
    extra = ["--trainer.max_epochs", "3"]
    if how == "copied run folder":
        shutil.copytree(runs / "version_0", runs / "version_4")
        extra += ["--ckpt_path", "runs/base/version_4/checkpoints/last.ckpt"]
        checkpoints = runs / "version_4" / "checkpoints"
    else:
        extra += ["--trainer.logger.init_args.save_dir", str(root / "runs"), "--ckpt_path", "last"]
        checkpoints = runs / "version_0" / "checkpoints"
    run_main("fit", *tiny_fit_args(root / "data"), *extra, cwd=root)
    names = sorted(path.name for path in checkpoints.iterdir())
    assert "last-v1.ckpt" not in names and len(names) == 2, names  # one best, one last
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 3 * STEPS_PER_EPOCH
    assert sorted(path.name for path in runs.iterdir()) == sorted(
        ["version_0", *(["version_4"] if how == "copied run folder" else [])]
    )


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

    from fmnist_lightning.data.datamodule import FashionMNISTDataModule

    model, _ = FashionMNISTClassifier.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    dm = FashionMNISTDataModule(data_dir=str(tiny_data_dir), download=False)
    dm.setup("fit")
    with torch.no_grad():
        accuracy = (model(dm.val_set.images).argmax(1) == dm.val_set.labels).float().mean().item()
    logged = float([row for row in read_metrics(run_dir) if row.get("val_acc")][-1]["val_acc"])
    assert logged == pytest.approx(accuracy, abs=1e-6)
    assert "run folder:       runs/base/version_0" in result.stdout

    # the test after fit covers all 100 test images (50 per process) once, in the metrics and the report
    best, _ = FashionMNISTClassifier.from_checkpoint(next((run_dir / "checkpoints").glob("best-*.ckpt")))
    dm.setup("test")
    with torch.no_grad():
        predicted = best(dm.test_set.images).argmax(1)
    test_acc = float([row for row in read_metrics(run_dir) if row.get("test_acc")][-1]["test_acc"])
    assert test_acc == pytest.approx((predicted == dm.test_set.labels).float().mean().item(), abs=1e-6)
    with open(run_dir / "confusion_matrix.csv", newline="") as file:
        counts = [int(cell) for row in list(csv.reader(file))[1:] for cell in row[1:]]
    assert sum(counts) == len(dm.test_set) == 100
