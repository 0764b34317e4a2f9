"""Checkpoints are code: tampered, missing, truncated and foreign files are refused; saving is atomic."""

import os
import pickle
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.training.checkpoints import SafeCheckpointIO, load_checkpoint
from helpers import run_main, tiny_fit_args, tree_snapshot


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def tampered(tiny_checkpoint, tmp_path):
    """A real checkpoint with a code-running object slipped into it."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    marker = tmp_path / "payload-ran"
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_tampered_checkpoint_is_refused_and_its_payload_never_runs(tampered):
    path, marker = tampered
    with pytest.raises(UserError, match=r"refusing to load .*tampered\.ckpt: it holds Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["test", "predict", "validate"])
def test_the_cli_refuses_a_tampered_checkpoint_without_running_it(tampered, tiny_data_dir, tmp_path, subcommand):
    path, marker = tampered
    result = run_main(subcommand, *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "refusing to load" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_export_refuses_a_tampered_checkpoint(tampered, tiny_data_dir, tmp_path):
    path, marker = tampered
    result = run_main("export", "--ckpt_path", str(path), "--data_dir", str(tiny_data_dir), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "refusing to load" in result.stderr
    assert not marker.exists()


def write_foreign(tmp_path):
    lightning_like = tmp_path / "other-model.ckpt"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "hyper_parameters": {"hidden": 3}}, lightning_like)
    plain = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), plain)
    return lightning_like, plain


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, ckpt: tmp / "missing.ckpt", "does not exist"),
        (lambda tmp, ckpt: _truncated(tmp, ckpt), "is not a readable checkpoint"),
        (lambda tmp, ckpt: write_foreign(tmp)[0], "belongs to another model"),
        (lambda tmp, ckpt: write_foreign(tmp)[1], "is not a Lightning checkpoint"),
    ],
)
def test_unusable_checkpoints_give_one_line_naming_the_file(tiny_checkpoint, tiny_data_dir, tmp_path, make, message):
    path = make(tmp_path, tiny_checkpoint)
    before = tree_snapshot(tmp_path)
    result = run_main("test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert message in last
    assert str(path) in last
    assert "Traceback" not in result.stderr
    assert tree_snapshot(tmp_path) == before  # no run folder, nothing changed


def _truncated(tmp_path, checkpoint):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(checkpoint.read_bytes()[:5000])
    return path


def test_a_checkpoint_with_other_layer_shapes_belongs_to_another_model(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["state_dict"]["network.dense.weight"] = torch.zeros(32, 576)
    path = tmp_path / "reshaped.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match=r"belongs to another model \(size mismatch for network.dense.weight"):
        FashionMNISTClassifier.from_checkpoint(path)


def test_model_from_checkpoint_restores_settings_and_weights(tiny_checkpoint):
    model, _ = FashionMNISTClassifier.from_checkpoint(tiny_checkpoint)
    saved = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert not model.training
    assert model.memory_format == torch.channels_last  # the base config's setting came back
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name])


def test_saving_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot save checkpoint .*: No space left on device \(disk full\?\)"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_plain_pickles_are_refused_too(tmp_path):
    path = tmp_path / "pickle.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(tmp_path / "ran")}))
    with pytest.raises(UserError):
        load_checkpoint(path)
    assert not (tmp_path / "ran").exists()


MARKER_MODULE = "planted_code"


def plant(checkpoint, where):
    """Name the planted module's code in the checkpoint's model settings, in one of the ways LightningCLI reads."""
    name = f"{MARKER_MODULE}.Thing"
    settings = checkpoint["hyper_parameters"]
    if where == "optimizer class_path":
        settings["optimizer"]["class_path"] = name
    elif where == "optimizer as a dotted string":
        settings["optimizer"] = name
    elif where == "nested in init_args":
        settings["optimizer"]["init_args"]["schedule"] = {"class_path": name, "init_args": {}}
    elif where == "model class":
        settings["_class_path"] = name
    elif where == "instantiator":
        settings["_instantiator"] = f"{MARKER_MODULE}.instantiate"
    elif where == "a path setting as a class":
        settings["teacher"] = {"class_path": name}


@pytest.mark.parametrize(
    "where",
    [
        "optimizer class_path",
        "optimizer as a dotted string",
        "nested in init_args",
        "model class",
        "instantiator",
        "a path setting as a class",
    ],
)
def test_a_checkpoint_naming_other_code_is_refused_before_any_import(
    tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch, where
):
    marker = tmp_path / "imported"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\nThing = instantiate = object\n")
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    plant(checkpoint, where)
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    monkeypatch.syspath_prepend(str(tmp_path))  # the planted module is importable, as on a user's PYTHONPATH
    args = ["test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", "planted.ckpt"]
    result = run_main(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"refusing to load planted.ckpt: its settings name {MARKER_MODULE}." in last
    assert not marker.exists() and MARKER_MODULE not in sys.modules


def test_the_classes_this_project_writes_are_accepted(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"]["class_path"] = "torch.optim.AdamW"
    checkpoint["hyper_parameters"]["_class_path"] = "fmnist_lightning.module.FashionMNISTClassifier"
    torch.save(checkpoint, tmp_path / "ok.ckpt")
    assert load_checkpoint(tmp_path / "ok.ckpt")["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.AdamW"


def test_settings_that_are_file_names_are_never_taken_for_code(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"] |= {"teacher": "teacher.ckpt", "pretrained": "mobilenet_v2.pt"}
    torch.save(checkpoint, tmp_path / "student.ckpt")
    assert load_checkpoint(tmp_path / "student.ckpt")["hyper_parameters"]["teacher"] == "teacher.ckpt"


@pytest.mark.slow  # three trainings; test_settings_that_are_file_names_are_never_taken_for_code is the fast check
def test_a_student_taught_by_a_teacher_named_without_a_folder_is_tested_after_fit(
    tiny_checkpoint, tiny_data_dir, tmp_path
):
    (tmp_path / "teacher.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    teacher = ["--model.teacher", "teacher.ckpt"]
    fit = ["fit", *tiny_fit_args(tiny_data_dir, epochs=1), *teacher]
    result = run_main(*fit, "--test_after_fit", "true", cwd=tmp_path)
    assert "test:             accuracy" in result.stdout
    last = tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt"
    run_main("test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(last), cwd=tmp_path)
    # resuming reads the student's settings too
    run_main("fit", *tiny_fit_args(tiny_data_dir, epochs=2), *teacher, "--ckpt_path", str(last), cwd=tmp_path)


def test_a_command_reads_each_checkpoint_file_once(workspace, tmp_path, monkeypatch):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root)  # fresh files: nothing of them was read in this process before
    checkpoints = root / "runs" / "base" / "version_0" / "checkpoints"
    reads: Counter[str] = Counter()
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        reads[Path(file).name] += 1
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    result = run_main("test", *tiny_fit_args(root / "data"), "--ckpt_path", "best", cwd=root)
    best = next(checkpoints.glob("best-*.ckpt"))
    assert f"checkpoint:       runs/base/version_0/checkpoints/{best.name}" in result.stdout
    # `best` is found through last.ckpt, then read for its settings, by LightningCLI, for the weights and by
    # the Trainer: each file once
    assert reads == {"last.ckpt": 1, best.name: 1}
