"""The CLI end to end on the tiny data: fit, test, versions, and one-line errors for bad input."""

import csv
import re
from pathlib import Path

import pytest
import yaml

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.cli import TOOL_COMMANDS, main
from fmnist_lightning.training.checkpoints import load_checkpoint
from fmnist_lightning.training.speed import fastest_precision
from helpers import BASE_CONFIG, read_metrics, run_main, tiny_fit_args, tree_snapshot


@pytest.fixture(scope="module")
def fitted_run(tiny_data_dir, tmp_path_factory):
    """`fit --test_after_fit true` once, shared by the tests that inspect its outputs."""
    workdir = tmp_path_factory.mktemp("cli")
    result = run_main("fit", *tiny_fit_args(tiny_data_dir), "--test_after_fit", "true", cwd=workdir)
    return workdir, result


def test_fit_logs_every_epoch_and_saves_best_and_last_checkpoints(fitted_run):
    workdir, _ = fitted_run
    run_dir = workdir / "runs" / "base" / "version_0"
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows if row["val_acc"]] == ["0", "1"]
    assert [row["epoch"] for row in rows if row["train_acc"]] == ["0", "1"]
    assert all(0 <= float(row["val_acc"]) <= 1 for row in rows if row["val_acc"])
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert [name for name in checkpoints if name.startswith("best-")]
    # the config leaves the precision unset; the run records the one chosen for this machine
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == fastest_precision("auto")


def test_test_after_fit_reports_the_best_checkpoints_score_and_where_things_are(fitted_run):
    workdir, result = fitted_run
    assert "weights_only" not in result.stdout + result.stderr  # no notice a user cannot act on, at every save
    run_dir = workdir / "runs" / "base" / "version_0"
    test_rows = [row for row in read_metrics(run_dir) if row["test_acc"]]
    assert len(test_rows) == 1
    printed = re.search(r"test:\s+accuracy (\d\.\d{4}), loss (\d+\.\d{4})", result.stdout)
    assert printed, result.stdout
    assert float(printed.group(1)) == pytest.approx(float(test_rows[0]["test_acc"]), abs=5e-5)
    assert float(printed.group(2)) == pytest.approx(float(test_rows[0]["test_loss"]), abs=5e-5)
    assert "run folder:       runs/base/version_0" in result.stdout
    assert "best checkpoint:  runs/base/version_0/checkpoints/best-" in result.stdout
    # this command's own training time: about what last.ckpt (saved after the last validation) recorded,
    # not that plus the time in the best checkpoint that --test_after_fit loaded
    printed = float(re.search(r"training time:    (\d+\.\d) s, validation included", result.stdout).group(1))
    timers = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]
    recorded = next(state["time_elapsed"]["train"] for name, state in timers.items() if name.startswith("Timer"))
    assert recorded - 0.05 <= printed <= 1.5 * recorded + 0.1


def test_test_subcommand_scores_a_checkpoint_file(fitted_run, tiny_data_dir):
    workdir, first = fitted_run
    best = next((workdir / "runs" / "base" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    result = run_main("test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(best), cwd=workdir)
    expected = re.search(r"test:\s+(accuracy \S+, loss \S+)", first.stdout).group(1)
    assert f"test:             {expected}" in result.stdout
    assert "training time" not in result.stdout  # nothing was trained


def test_a_second_fit_gets_its_own_version_and_leaves_the_first_untouched(fitted_run, tiny_data_dir):
    workdir, _ = fitted_run
    first_run = workdir / "runs" / "base" / "version_0"
    before = tree_snapshot(first_run)
    result = run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=1), cwd=workdir)
    assert tree_snapshot(first_run) == before
    second_run = re.search(r"run folder:\s+(runs/base/version_\d+)", result.stdout).group(1)
    assert second_run != "runs/base/version_0"
    assert (workdir / second_run / "checkpoints" / "last.ckpt").is_file()


def test_val_size_zero_trains_on_every_image_and_tests_the_last_checkpoint(tmp_path, tiny_data_dir):
    args = [*tiny_fit_args(tiny_data_dir), "--data.val_size", "0"]
    result = run_main("fit", *args, "--test_after_fit", "true", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "base" / "version_0"
    rows = read_metrics(run_dir)
    assert "val_acc" not in rows[0]  # validation never ran
    # all 400 images train: 13 batches of 32 an epoch (steps are 0-based), against 10 with 80 held out
    assert [row["step"] for row in rows if row["train_acc"]] == ["12", "25"]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    last = str(run_dir / "checkpoints" / "last.ckpt")
    assert "training time:" in result.stdout and ", no validation" in result.stdout
    tested = run_main("test", *tiny_fit_args(tiny_data_dir), "--data.val_size", "0", "--ckpt_path", last, cwd=tmp_path)
    assert re.search(r"test: +accuracy", tested.stdout)
    assert [line for line in result.stdout.splitlines() if line.startswith("test:")] == [
        line for line in tested.stdout.splitlines() if line.startswith("test:")
    ]  # --test_after_fit scored the last epoch
    before = tree_snapshot(tmp_path)
    refused = run_main("validate", *args, "--ckpt_path", last, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("fmnist: error: data.val_size is 0")
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.batch_size", "0"], "data.batch_size must be at least 1, got 0"),
        (["--data.batch_size", "-3"], "data.batch_size must be at least 1, got -3"),
        (
            ["--data.batch_size", "abc"],
            "Parser key \"data.batch_size\": Expected a <class 'int'>. Got value: abc",
        ),
        (["--data.val_size", "60000"], "data.val_size=60000 asks for 60,000 of the 400"),
        (["--trainer.max_epochz", "3"], "unrecognized arguments: --trainer.max_epochz"),
    ],
)
def test_bad_settings_give_one_line_and_a_nonzero_exit(tmp_path, tiny_data_dir, extra, message):
    result = run_main("fit", *tiny_fit_args(tiny_data_dir), *extra, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fmnist: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_or_non_yaml_config_files_are_refused(tmp_path):
    not_yaml = tmp_path / "notes.yaml"
    not_yaml.write_text("just: [unclosed\n")
    for config, message in (
        (tmp_path / "nope.yaml", "File does not exist"),
        (not_yaml, "Problems parsing config"),
    ):
        result = run_main("fit", "--config", str(config), cwd=tmp_path, check=False)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr


def test_missing_data_with_no_way_to_get_it_is_one_line(tmp_path):
    result = run_main(
        "fit",
        "--config",
        str(BASE_CONFIG),
        "--data.data_dir",
        str(tmp_path / "empty"),
        "--data.system_dir",
        str(tmp_path / "no-system-copy"),
        "--data.download",
        "false",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fmnist: error: Fashion-MNIST not found")
    assert not (tmp_path / "runs").exists()
    assert "Traceback" not in result.stderr


def test_fit_and_test_leave_their_pictures_and_reports_in_the_run_folder(fitted_run):
    workdir, result = fitted_run
    run_dir = workdir / "runs" / "base" / "version_0"
    for name in (
        "accuracy.png",
        "loss.png",
        "confusion_matrix.png",
        "most_confident_mistakes.png",
        "test_samples.png",
    ):
        assert (run_dir / name).stat().st_size > 10_000, name
        assert str(Path("runs/base/version_0") / name) in result.stdout
    with open(run_dir / "confusion_matrix.csv", newline="") as file:
        counts = [[int(cell) for cell in row[1:]] for row in list(csv.reader(file))[1:]]
    test_acc = float(next(row["test_acc"] for row in read_metrics(run_dir) if row["test_acc"]))
    assert sum(map(sum, counts)) == 100  # the tiny test set
    assert sum(counts[i][i] for i in range(10)) / 100 == pytest.approx(test_acc)
    with open(run_dir / "per_class_report.csv", newline="") as file:
        report = list(csv.reader(file))
    assert [row[0] for row in report[1:11]] == list(CLASS_NAMES)
    assert report[-1][0] == "micro average"
    assert float(report[-1][2]) == pytest.approx(test_acc, abs=5e-5)
    assert "| micro average |" in result.stdout


def test_the_help_names_every_tool_command_from_the_command_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # the help wraps its lines
    for command in TOOL_COMMANDS.values():
        assert f"`{command.usage}` {command.summary}" in text
