"""The strong network (a pre-activation ResNet) and knowledge distillation from a teacher checkpoint."""

import contextlib
import io

import pytest
import torch

from fmnist_lightning.commands.lightning import lightning_command
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from helpers import run_main, tiny_fit_args


def test_the_resnet_is_resnet_20_by_default_and_checks_its_depth():
    model = FashionMNISTClassifier(architecture="resnet")
    assert sum(p.numel() for p in model.parameters()) == 271_994  # ResNet-20's size
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)
    assert sum(p.numel() for p in FashionMNISTClassifier(architecture="resnet", depth=8, width=8).parameters()) < 20_000
    with pytest.raises(UserError, match="depth must be 6n"):
        FashionMNISTClassifier(architecture="resnet", depth=21)


def test_a_student_learns_from_a_frozen_teacher_that_is_never_saved_with_it(
    tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch
):
    teacher_weights = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["fmnist"])
    student = ["--model.batch_norm", "true", "--model.teacher", str(tiny_checkpoint), "--model.distill_weight", "0.5"]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = lightning_command(["fit", *tiny_fit_args(tiny_data_dir, epochs=1), *student])
    teacher = cli.model.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():  # frozen: exactly the checkpoint's weights after training
        assert torch.equal(tensor, teacher_weights[name])
    saved = torch.load(tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher") for key in saved["state_dict"])  # the student alone
    assert saved["hyper_parameters"]["teacher"] == str(tiny_checkpoint)
    # scoring the student never needs its teacher: the teacher is loaded only when fit starts
    run_main(
        "test",
        *tiny_fit_args(tiny_data_dir),
        "--ckpt_path",
        str(tmp_path / "runs/base/version_0/checkpoints/last.ckpt"),
        cwd=tmp_path,
    )


class Payload:
    """Stands for code a tampered teacher checkpoint would run when unpickled."""


def test_a_teacher_checkpoint_is_loaded_without_running_pickled_code(tiny_data_dir, tmp_path):
    tampered = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, tampered)
    result = run_main(
        "fit", *tiny_fit_args(tiny_data_dir, epochs=1), "--model.teacher", str(tampered), cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "refusing to load" in result.stderr.strip().splitlines()[-1]


def test_the_distillation_loss_measures_the_distance_to_the_teachers_softened_predictions():
    torch.manual_seed(0)
    student, teacher = FashionMNISTClassifier(distill_temperature=2.0), FashionMNISTClassifier().eval()
    object.__setattr__(student, "teacher", teacher)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        same = student._distillation(images, teacher(images))
        uniform = student._distillation(images, torch.zeros(4, 10))
    assert torch.allclose(same, torch.zeros(4), atol=1e-6)
    softened = (teacher(images).detach() / 2.0).softmax(dim=1)
    expected = (softened * (softened.log() - torch.log(torch.tensor(0.1)))).sum(dim=1) * 2.0**2  # KL to uniform, x T^2
    torch.testing.assert_close(uniform, expected, atol=1e-5, rtol=1e-5)
