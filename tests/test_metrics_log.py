"""Reading Lightning CSV logs of every awkward shape into per-epoch series."""

import pytest

from fmnist_lightning.errors import UserError
from fmnist_lightning.reports.metrics_log import NoCurvesError, metrics_files, read_run


def write_log(folder, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.csv"
    path.write_text(text)
    return path


# Lightning's own layout: validation and train on separate rows, then a test row one epoch later.
SEPARATE_ROWS = """epoch,step,test_acc,test_loss,train_acc,train_loss,val_acc,val_loss
0,99,,,,,0.70,0.90
0,99,,,0.60,1.10,,
1,199,,,,,0.80,0.60
1,199,,,0.75,0.70,,
2,200,0.79,0.62,,,,
"""


def test_train_and_validation_rows_are_merged_per_epoch(tmp_path):
    run = read_run(write_log(tmp_path / "base" / "version_3", SEPARATE_ROWS))
    assert run.name == "base/version_3"
    assert run.series("val_acc") == ([0, 1], [0.70, 0.80])
    assert run.series("train_loss") == ([0, 1], [1.10, 0.70])
    assert run.final == {"test_acc": 0.79, "test_loss": 0.62}
    assert "test_acc" not in run.epochs


def test_step_columns_are_ignored_and_epoch_columns_lose_their_suffix(tmp_path):
    text = """epoch,step,train_loss_epoch,train_loss_step,val_loss
0,49,,0.9,
0,99,,0.8,
0,99,,,0.7
0,99,0.85,,
1,149,,0.5,
1,199,,0.4,
1,199,,,0.45
1,199,0.55,,
"""
    run = read_run(write_log(tmp_path, text))
    assert run.series("train_loss") == ([0, 1], [0.85, 0.55])
    assert run.series("val_loss") == ([0, 1], [0.7, 0.45])
    assert set(run.epochs) == {"train_loss", "val_loss"}


def test_an_epoch_logged_twice_by_a_resumed_run_keeps_the_latest_value(tmp_path):
    text = """epoch,step,val_acc
0,10,0.5
1,20,0.6
1,20,0.65
2,30,0.7
"""
    run = read_run(write_log(tmp_path, text))
    assert run.series("val_acc") == ([0, 1, 2], [0.5, 0.65, 0.7])


def test_runs_with_only_some_metrics_and_a_single_epoch(tmp_path):
    run = read_run(write_log(tmp_path, "epoch,step,val_acc\n0,5,0.42\n"))
    assert run.series("val_acc") == ([0], [0.42])
    assert run.series("train_acc") == ([], [])


def test_a_folder_of_runs_yields_every_log(tmp_path):
    a = write_log(tmp_path / "base" / "version_0", SEPARATE_ROWS)
    b = write_log(tmp_path / "improved" / "version_0", SEPARATE_ROWS)
    assert metrics_files(tmp_path) == [a, b]
    assert metrics_files(a.parent) == [a]
    assert metrics_files(a) == [a]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("epoch,step,test_acc\n1,5,0.9\n", "no per-epoch train or validation metrics"),
        ("epoch,step\n", "no per-epoch train or validation metrics"),
        ("name,score\nalice,3\n", "is not a Lightning CSVLogger log"),
        ("", "is not a Lightning CSVLogger log"),
        ("epoch,step,val_acc\n0,1,high\n", "holds 'high', not a number"),
        ("epoch,step,val_acc\nfirst,1,0.5\n", "has a row with epoch 'first'"),
    ],
)
def test_logs_that_cannot_be_plotted_give_one_clear_error(tmp_path, content, message):
    with pytest.raises(UserError, match=message) as error:
        read_run(write_log(tmp_path, content))
    assert "\n" not in str(error.value)


def test_test_only_logs_raise_the_specific_error(tmp_path):
    with pytest.raises(NoCurvesError):
        read_run(write_log(tmp_path, "epoch,step,test_acc\n1,5,0.9\n"))


def test_unreadable_and_missing_paths(tmp_path):
    binary = tmp_path / "metrics.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(UserError, match="cannot read"):
        read_run(binary)
    with pytest.raises(UserError, match="does not exist"):
        metrics_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no metrics\.csv under"):
        metrics_files(tmp_path / "empty")
