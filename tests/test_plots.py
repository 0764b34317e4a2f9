"""Curves and pictures: the plotted data equals the logged data, and bad input writes nothing."""

import numpy as np
import pytest
from matplotlib.image import imread

from fmnist_lightning.cli import main
from fmnist_lightning.errors import UserError
from fmnist_lightning.reports.curves import draw_curves
from fmnist_lightning.reports.metrics_log import read_run
from fmnist_lightning.reports.plots import confusion_matrix_figure, curve_figure, image_grid_figure
from helpers import tree_snapshot

LOG = """epoch,step,test_acc,test_loss,train_acc,train_loss,val_acc,val_loss
0,99,,,,,0.70,0.90
0,99,,,0.60,1.10,,
1,199,,,,,0.80,0.60
1,199,,,0.75,0.70,,
2,299,,,,,0.84,0.50
2,299,,,0.82,0.52,,
3,300,0.83,0.51,,,,
"""


def write_run(folder, text=LOG):
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(text)
    return folder


def lines_by_label(figure):
    return {line.get_label(): line for line in figure.axes[0].get_lines()}


def test_one_run_plots_train_and_validation_on_the_same_axes(tmp_path):
    run = read_run(write_run(tmp_path / "base" / "version_0") / "metrics.csv")
    lines = lines_by_label(curve_figure([run], "acc"))
    assert set(lines) == {"train", "validation", "test: 0.8300"}
    assert list(lines["train"].get_xdata()) == [1, 2, 3]  # epochs shown 1-based, as Keras prints them
    assert list(lines["train"].get_ydata()) == [0.60, 0.75, 0.82]
    assert list(lines["validation"].get_ydata()) == [0.70, 0.80, 0.84]
    assert list(lines["test: 0.8300"].get_ydata()) == [0.83, 0.83]
    loss = lines_by_label(curve_figure([run], "loss"))
    assert list(loss["validation"].get_ydata()) == [0.90, 0.60, 0.50]
    figure_axes = curve_figure([run], "loss").axes[0]
    assert figure_axes.get_xlabel() == "epoch"
    assert "Loss" in figure_axes.get_title()


def test_a_one_epoch_run_is_drawn_with_markers(tmp_path):
    run = read_run(write_run(tmp_path / "r", "epoch,step,val_acc,train_acc\n0,9,0.5,\n0,9,,0.4\n") / "metrics.csv")
    lines = lines_by_label(curve_figure([run], "acc"))
    assert list(lines["validation"].get_ydata()) == [0.5]
    assert lines["validation"].get_marker() == "o"


def test_several_runs_are_compared_in_one_figure_labelled_by_run(tmp_path):
    base = write_run(tmp_path / "runs" / "base" / "version_0")
    other = write_run(tmp_path / "runs" / "improved" / "version_0", LOG.replace("0.84", "0.91"))
    runs = [read_run(base / "metrics.csv"), read_run(other / "metrics.csv")]
    lines = lines_by_label(curve_figure(runs, "acc"))
    assert set(lines) == {
        "base/version_0 (train)",
        "base/version_0 (validation)",
        "improved/version_0 (train)",
        "improved/version_0 (validation)",
    }
    assert list(lines["improved/version_0 (validation)"].get_ydata()) == [0.70, 0.80, 0.91]
    assert lines["base/version_0 (train)"].get_color() == lines["base/version_0 (validation)"].get_color()
    assert lines["base/version_0 (train)"].get_color() != lines["improved/version_0 (train)"].get_color()


def test_draw_curves_writes_png_into_the_run_folder_and_svg_on_request(tmp_path):
    run = write_run(tmp_path / "base" / "version_0")
    written = draw_curves([run], formats=["png", "svg"])
    assert sorted(p.name for p in written) == ["accuracy.png", "accuracy.svg", "loss.png", "loss.svg"]
    assert all(p.parent == run for p in written)
    height, width, _ = imread(run / "accuracy.png").shape
    assert (width, height) == (900, 576)


def test_a_folder_of_runs_gives_one_comparison_in_that_folder_skipping_test_only_logs(tmp_path):
    write_run(tmp_path / "runs" / "base" / "version_0")
    write_run(tmp_path / "runs" / "base" / "version_1", "epoch,step,test_acc\n0,0,0.8\n")
    write_run(tmp_path / "runs" / "improved" / "version_0")
    written = draw_curves([tmp_path / "runs"])
    assert written == [tmp_path / "runs" / "accuracy.png", tmp_path / "runs" / "loss.png"]


def test_plot_command_writes_where_asked(tmp_path, capsys):
    run = write_run(tmp_path / "base" / "version_0")
    main(["plot", str(run), "--out", str(tmp_path / "pictures")])
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["accuracy.png", "loss.png"]
    assert str(tmp_path / "pictures" / "accuracy.png") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: write_run(root / "r", "epoch,step,test_acc\n0,0,0.8\n"), "no per-epoch"),
        (lambda root: write_run(root / "r", "a,b\n1,2\n"), "not a Lightning CSVLogger log"),
        (lambda root: write_run(root / "r", "\x00\xff garbage"), "not a Lightning CSVLogger log|cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make, message):
    path = make(tmp_path)
    before = tree_snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fmnist: error: ")
    assert any(part in err for part in message.split("|"))
    assert tree_snapshot(tmp_path) == before


def test_unwritable_output_folder_is_refused(tmp_path):
    run = write_run(tmp_path / "r")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"file/sub: .*file is a file, not a folder; choose another path with --out"):
        draw_curves([run], out=blocker / "sub")


def test_confusion_matrix_figure_shows_counts_and_row_normalised_values():
    counts = np.array([[3, 1], [0, 4]])
    normalised = counts / counts.sum(axis=1, keepdims=True)
    figure = confusion_matrix_figure(counts, normalised, ["cat", "dog"])
    count_axes, normalised_axes = [axes for axes in figure.axes if axes.get_title()]  # not the colour bars
    assert [t.get_text() for t in count_axes.texts] == ["3", "1", "0", "4"]
    assert [t.get_text() for t in normalised_axes.texts] == ["0.75", "0.25", "0.00", "1.00"]
    assert [t.get_text() for t in count_axes.get_xticklabels()] == ["cat", "dog"]
    assert count_axes.get_ylabel() == "true class"


def test_image_grid_colours_captions_by_correctness():
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    figure = image_grid_figure(images, ["a", "b", "c"], [True, False, True], "title", columns=2)
    titles = [(ax.get_title(), ax.title.get_color()) for ax in figure.axes if ax.get_title()]
    assert titles == [("a", "tab:green"), ("b", "tab:red"), ("c", "tab:green")]
    assert len(figure.axes) == 4  # 2x2 grid, the last one empty


def test_nan_and_inf_points_are_named_when_they_are_left_out(tmp_path, capsys):
    run = write_run(tmp_path / "r", LOG.replace("0.80,0.60", "0.80,nan").replace("0.84,0.50", "0.84,inf"))
    main(["plot", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fmnist: warning: {run / 'metrics.csv'}: val_loss is NaN or inf at epochs 2, 3 (counted from 1); "
        "those points are left out of the curves"
    ]
    assert (run / "loss.png").is_file()
