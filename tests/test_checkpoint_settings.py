"""With --ckpt_path, which settings come from the checkpoint and which from the command line, and the
config.yaml a resumed run leaves behind."""

import contextlib
import csv
import io

import torch
import yaml

from fmnist_lightning.commands.lightning import lightning_command
from helpers import run_main, tiny_fit_args


def run_in(tmp_path, monkeypatch, *args):
    """The CLI in this process; the CLI object (its model) and what it printed on stderr."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["fmnist"])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        cli = lightning_command(list(args))
    return cli, stderr.getvalue()


def test_speed_settings_follow_the_command_line_over_the_checkpoint(
    tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch
):
    speed = ["--model.channels_last", "false", "--model.pool_before_relu", "false", "--model.cuda_graph", "false"]
    cli, stderr = run_in(
        tmp_path, monkeypatch, "test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), *speed
    )
    assert not cli.model.hparams.channels_last and cli.model.memory_format == torch.contiguous_format
    assert not cli.model.hparams.pool_before_relu and not cli.model.hparams.cuda_graph
    assert list(cli.model.network)[1].__class__.__name__ == "ReLU"  # ReLU before pooling, as asked
    assert "warning" not in stderr


def test_a_model_defining_setting_comes_from_the_checkpoint_with_a_warning(
    tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch
):
    args = ["test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), "--model.batch_norm", "true"]
    cli, stderr = run_in(tmp_path, monkeypatch, *args)
    assert cli.model.hparams.batch_norm is False  # the checkpoint's: its weights have no BatchNorm
    assert "fmnist: warning: --model.batch_norm True is ignored: the checkpoint's model has False" in stderr
    assert stderr.count("warning") == 1


def test_a_resumed_run_s_config_reruns_the_recipe_from_scratch(tiny_data_dir, tmp_path):
    run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=1), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "base" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=2), "--ckpt_path", str(last), cwd=tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["ckpt_path"] is None
    assert config["trainer"]["logger"]["init_args"]["version"] is None
    assert config["trainer"]["max_epochs"] == 2
    resumed = yaml.safe_load((run_dir / "resumed.yaml").read_text())
    assert resumed == {"ckpt_path": str(last), "version": 0}
    run_main("fit", "--config", str(run_dir / "config.yaml"), cwd=tmp_path)  # from scratch: a new run folder
    assert (tmp_path / "runs" / "base" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_lr_find_sweeps_the_configured_optimizer_and_saves_its_plot(tiny_data_dir, tmp_path):
    result = run_main(
        "lr_find",
        *tiny_fit_args(tiny_data_dir),
        "--trainer.max_epochs",
        "4",
        "--num_training",
        "30",
        "--max_lr",
        "0.1",
        cwd=tmp_path,
    )
    plot = tmp_path / "runs" / "base" / "version_0" / "lr_find.png"
    assert f"lr_find plot:     {plot.relative_to(tmp_path)}" in result.stdout
    assert plot.stat().st_size > 10_000
    suggestion = float(result.stdout.split("suggested lr:")[1].split()[0])
    assert 1e-6 <= suggestion <= 0.1
    assert not list(tmp_path.glob(".lr_find*"))  # Lightning's temporary checkpoint is gone


def test_tensorboard_and_mlflow_log_beside_the_csv_log_in_one_run_folder(tiny_data_dir, tmp_path):
    run_main("fit", *tiny_fit_args(tiny_data_dir), "--extra_loggers", "[tensorboard, mlflow]", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "base" / "version_0"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    (mlflow_run,) = [path.parent for path in (run_dir / "mlruns").glob("*/*/meta.yaml")]
    assert {"train_acc", "val_acc", "val_loss"} <= {path.name for path in (mlflow_run / "metrics").iterdir()}
    assert (mlflow_run / "params" / "batch_size").read_text() == "32"
    for kept in ("metrics.csv", "accuracy.png", "loss.png", "config.yaml", "checkpoints/last.ckpt"):
        assert (run_dir / kept).is_file()
    assert sorted(path.name for path in (tmp_path / "runs" / "base").iterdir()) == ["version_0"]  # one run folder
    tested = run_main("test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", "last", cwd=tmp_path)
    assert "test:" in tested.stdout


def test_a_logger_other_than_the_csv_log_alone_says_the_curves_are_missing(tiny_data_dir, tmp_path):
    tensorboard_only = [
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        "tb",
    ]
    result = run_main("fit", *tiny_fit_args(tiny_data_dir), *tensorboard_only, cwd=tmp_path)
    assert "fmnist: warning: no accuracy.png/loss.png: they are drawn from the CSV log" in result.stderr
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_lightning_callbacks_from_the_command_line(tiny_data_dir, tmp_path):
    callbacks = [
        # stops once val_acc has not improved by 1.0 for one epoch: after the second epoch, whatever happens
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_acc", "--trainer.callbacks.mode=max",
        "--trainer.callbacks.patience=1", "--trainer.callbacks.min_delta=1.0",
        "--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval=epoch",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=5",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename=step-{step}",
        "--trainer.callbacks+=RichProgressBar",
    ]  # fmt: skip
    args = [*tiny_fit_args(tiny_data_dir), "--trainer.max_epochs", "5", "--trainer.enable_progress_bar", "true"]
    run_main("fit", *args, *callbacks, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "base" / "version_0"
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert max(int(row["epoch"]) for row in rows if row.get("val_acc")) == 1  # stopped early, epochs 0 and 1
    assert [float(row["lr-Adam"]) for row in rows if row.get("lr-Adam")][:1] == [0.001]
    steps = sorted(int(path.stem.split("=")[1]) for path in (run_dir / "checkpoints").glob("step-step=*.ckpt"))
    assert steps == [5, 10, 15, 20]


def test_extra_loggers_without_the_csv_log_are_refused(tiny_data_dir, tmp_path):
    args = [*tiny_fit_args(tiny_data_dir), "--trainer.logger", "false", "--extra_loggers", "[tensorboard]"]
    result = run_main("fit", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "--extra_loggers log beside the run's CSV log" in result.stderr.strip().splitlines()[-1]
