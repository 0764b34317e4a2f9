"""Bad input: one line saying what is wrong and what to do, exit 2, and nothing that was on disk changed.

Settings, files and paths that this project, Lightning, torch or the OS refuse; results that would mean
nothing (an untrained model, NaN weights, validation images it trained on); resumes that would compute
something else than the interrupted run; and runs whose loss blows up.
"""

import re
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from fmnist_lightning.data.files import raw_folder
from fmnist_lightning.errors import UserError
from fmnist_lightning.training.checkpoints import SafeCheckpointIO
from fmnist_lightning.training.run_folders import claim_run_folder
from fmnist_lightning.training.run_log import RunCSVLogger
from helpers import BASE_CONFIG, REPO, cli_environment, run_main, tiny_fit_args, tree_snapshot

LAST = "runs/base/version_0/checkpoints/last.ckpt"


def command(subcommand, *extra):
    return lambda root: [subcommand, *tiny_fit_args(root / "data", epochs=3), *extra]


def with_checkpoint(subcommand, *extra):
    return command(subcommand, "--ckpt_path", LAST, *extra)


def nan_checkpoint(root):
    checkpoint = torch.load(root / LAST, weights_only=True)
    checkpoint["state_dict"]["network.dense.weight"][0, 0] = float("nan")
    torch.save(checkpoint, root / "nan.ckpt")
    return str(root / "nan.ckpt")


def prepared(prepare, make_args):
    """Args from `make_args` after `prepare(root)` has changed the workspace (before the snapshot)."""

    def args(root):
        prepare(root)
        return make_args(root)

    return args


def write(name, content):
    return lambda root: (root / name).write_bytes(content)


def bad_labels(root):
    labels = raw_folder(root / "data") / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x0c")


def corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes(b"\x00\x00\x09\x03" + data[4:] if how == "magic" else data[: len(data) // 3])


def broken_yaml(root):
    (root / "broken.yaml").write_text("trainer: {max_epochs: [\n")
    return ["fit", "--config", str(root / "broken.yaml")]


def data_args(root):
    return command("fit")(root)


def missing_data_args(root):
    no_data = ["--data.data_dir", str(root / "empty"), "--data.system_dir", str(root / "none")]
    return ["fit", "--config", str(BASE_CONFIG), *no_data, "--data.download", "false"]


def resume_args(root, *extra):
    return [*data_args(root), "--ckpt_path", "last", *extra]


REFUSED = {
    # results that would mean nothing
    "test without a checkpoint": (command("test"), "test needs a trained model: give --ckpt_path"),
    "validate without a checkpoint": (command("validate"), "validate needs a trained model"),
    "predict without a checkpoint": (command("predict"), "predict needs a trained model"),
    "test a checkpoint with NaN weights": (
        lambda root: [*command("test")(root), "--ckpt_path", nan_checkpoint(root)],
        "holds weights that are not finite (NaN or inf in network.dense.weight)",
    ),
    "predict with NaN weights": (
        lambda root: [*command("predict")(root), "--ckpt_path", nan_checkpoint(root)],
        "holds weights that are not finite",
    ),
    "export NaN weights": (
        lambda root: ["export", "--ckpt_path", nan_checkpoint(root), "--data_dir", str(root / "data")],
        "holds weights that are not finite",  # not the exporter's fault
    ),
    "validate on another split": (
        with_checkpoint("validate", "--data.split_seed", "7"),
        "refusing to validate runs/base/version_0/checkpoints/last.ckpt on another split than its run's "
        "(data.split_seed is 7 here, 42 in its run)",
    ),
    "an empty list of pictures": (
        with_checkpoint("predict", "--data.predict_paths", "[]"),
        "data.predict_paths is an empty list",
    ),
    # resumes that would compute something else than the interrupted run
    "resume with another batch size": (
        with_checkpoint("fit", "--data.batch_size", "16"),
        "cannot resume from runs/base/version_0/checkpoints/last.ckpt with other settings than its run's: "
        "data.batch_size is 16 here, 32 in its run",
    ),
    "resume with another seed and model": (
        with_checkpoint("fit", "--seed_everything", "7", "--model.dropout", "0.5"),
        "model.dropout is 0.5 here, 0.0 in its run; seed_everything is 7 here, 42 in its run",
    ),
    "resume with another precision": (
        with_checkpoint("fit", "--trainer.precision", "bf16-true"),
        "trainer.precision is 'bf16-true' here",
    ),
    # settings and paths that Lightning, torch or the OS refuse
    "max_epochs 0": (command("fit", "--trainer.max_epochs", "0"), "trainer.max_epochs must be at least 1"),
    "negative max_epochs": (command("fit", "--trainer.max_epochs=-5"), "trainer.max_epochs must be at least 1"),
    "negative learning rate": (
        command("fit", "--model.optimizer.init_args.lr=-0.001"),
        "model.optimizer: Invalid learning rate: -0.001",
    ),
    "negative num_workers": (command("fit", "--data.num_workers=-1"), "data.num_workers must be 0"),
    "config file not UTF-8": (
        prepared(
            write("latin1.yaml", "trainer:\n  max_epochs: 2  # caf\xe9\n".encode("latin-1")),
            lambda root: [*command("fit")(root), "--config", str(root / "latin1.yaml")],
        ),
        "is not UTF-8 (byte 0xe9",
    ),
    "data_dir a regular file": (
        prepared(write("a-file", b"x"), lambda root: ["fit", *tiny_fit_args(root / "a-file")]),
        "a-file is a file, not a folder; choose another path with --data.data_dir",
    ),
    "labels out of range": (
        prepared(bad_labels, command("fit")),
        "train-labels-idx1-ubyte holds labels outside 0..9 (found 12)",
    ),
    "predictions output a folder": (
        with_checkpoint("predict", "--predictions.output", "runs"),
        "runs is a folder; give a file name with --predictions.output",
    ),
    "output under a regular file": (
        prepared(write("a-file", b"x"), with_checkpoint("predict", "--predictions.output", "a-file/p.csv")),
        "a-file is a file, not a folder; choose another path with --predictions.output",
    ),
    "nothing could be predicted": (
        prepared(write("notes.png", b"not a picture"), with_checkpoint("predict", "--data.predict_paths=[notes.png]")),
        "nothing could be predicted: all 1 inputs failed (first: notes.png: not an image Pillow can read)",
    ),
    "random bytes as a checkpoint": (
        prepared(
            write("random.ckpt", torch.randint(0, 256, (65536,), dtype=torch.uint8).numpy().tobytes()),
            command("test", "--ckpt_path", "random.ckpt"),
        ),
        "random.ckpt is not a readable checkpoint (not a PyTorch zip archive",
    ),
    "a run folder as the checkpoint": (
        command("test", "--ckpt_path", "runs/base/version_0"),
        "runs/base/version_0 is a folder; give the path of a .ckpt file, e.g. "
        "runs/base/version_0/checkpoints/last.ckpt",
    ),
    # the newer commands and settings (third round)
    "lr_find from 0": (command("lr_find", "--min_lr", "0"), "lr_find sweeps from --min_lr up to --max_lr, both"),
    "lr_find from a negative rate": (command("lr_find", "--min_lr=-1e-3"), "both positive: got -0.001 and 1"),
    "lr_find up to a negative rate": (command("lr_find", "--max_lr=-1"), "both positive: got 1e-06 and -1"),
    "lr_find range upside down": (command("lr_find", "--min_lr", "0.1", "--max_lr", "0.01"), "got 0.1 and 0.01"),
    "lr_find no steps": (command("lr_find", "--num_training", "0"), "--num_training 0 is too few steps"),
    "lr_find one step": (command("lr_find", "--num_training", "1"), "give at least 13 (the default is 100)"),
    "lr_find negative steps": (command("lr_find", "--num_training=-5"), "--num_training -5 is too few steps"),
    "lr_find rate not a number": (
        command("lr_find", "--min_lr", "abc"),
        "argument --min_lr: invalid float value: 'abc' (see `fmnist SUBCOMMAND --help` for the options)",
    ),
    "a resnet depth for the original network": (
        command("fit", "--model.depth", "21"),
        "model.depth 21 only applies to model.architecture resnet, and this run's is original",
    ),
    "a resnet width for the original network": (command("fit", "--model.width", "8"), "model.width 8 only applies"),
    "a batch larger than the training split": (
        command("fit", "--data.batch_size", "1000000"),
        "data.batch_size 1,000,000 is more than the 320 training images: every epoch would be one smaller batch",
    ),
    "a teacher that does not exist": (
        command("fit", "--model.teacher", "no-teacher.ckpt"),
        "checkpoint no-teacher.ckpt does not exist",
    ),
    # from the first round
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
        "a-file is a file, not a folder; choose another path with --trainer.logger.init_args.save_dir",
    ),
}


if not torch.cuda.is_available():
    REFUSED["a GPU where there is none"] = (
        command("fit", "--trainer.accelerator", "gpu"),
        "(a trainer setting; see `fmnist fit --help`)",
    )


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line_and_the_disk_as_it_was(workspace, tmp_path, case):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    make_args, message = REFUSED[case]
    args = make_args(root)
    before, paths_before = tree_snapshot(root), all_paths(root)
    result = run_main(*args, cwd=root, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fmnist: error: ") and message in last_line, last_line
    assert tree_snapshot(root) == before
    assert all_paths(root) == paths_before  # no new folder either: a failed run takes its run folder back


def all_paths(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_failed_download_leaves_no_new_folders(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network unreachable")

    monkeypatch.setattr("fmnist_lightning.data.files.FashionMNIST", offline)
    args = ["fit", *tiny_fit_args(tmp_path / "data" / "fmnist"), "--data.download", "true"]
    result = run_main(*args, "--data.system_dir", str(tmp_path / "none"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "the download failed (Error downloading train-images-idx3-ubyte.gz" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither data/ nor runs/


def test_a_loss_gone_to_infinity_stops_the_run_before_it_is_saved(workspace, tmp_path):
    # lr 1e4 keeps the weights finite (the NaN check alone let such runs finish) but the loss explodes
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    before = tree_snapshot(root)
    result = run_main(*command("fit", "--model.optimizer.init_args.lr", "1e4")(root), cwd=root, check=False)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert "training diverged at epoch 0, step 10: the epoch's training loss is" in last_line
    assert "is the learning rate too high?" in last_line and "no checkpoint was saved" in last_line
    assert not list(root.glob("runs/base/version_1/checkpoints/*.ckpt"))
    assert {name: data for name, data in tree_snapshot(root).items() if not name.startswith("runs/base/version_1")} == (
        before
    )


def test_two_runs_started_together_get_a_folder_each(tmp_path):
    first, second = (RunCSVLogger(tmp_path, name="base") for _ in range(2))
    # both choose a number before either has created its folder, as two processes started together do
    assert first._get_next_version() == second._get_next_version() == 0
    claimed = [claim_run_folder(first), claim_run_folder(second)]
    assert (first.version, second.version) == (0, 1)
    assert [folder.path for folder in claimed] == [tmp_path / "base" / "version_0", tmp_path / "base" / "version_1"]
    assert first.log_dir != second.log_dir


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
    result = run_main(*data_args(root), "--model.optimizer.init_args.lr", "1e30", cwd=root, check=False)
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


@pytest.mark.parametrize("value", ["0", "-1", "abc", ""])
def test_a_bad_thread_count_is_refused_before_anything_runs(workspace, tmp_path, monkeypatch, value):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)
    before = tree_snapshot(root)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    result = run_main(*data_args(root), cwd=root, check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"fmnist: error: OMP_NUM_THREADS={value!r} is not a thread count; set a whole number of at least 1")
    )
    assert tree_snapshot(root) == before
