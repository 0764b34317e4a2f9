"""Run folders and checkpoints written by 0.1.0 (before the topic subpackages) keep working."""

import shutil
from pathlib import Path

import pytest
import torch

from helpers import BASE_CONFIG, run_main

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"
OLD_CLASS_PATHS = (
    "fmnist_lightning.run_log.RunCSVLogger",
    "fmnist_lightning.callbacks.CurvePlots",
    "fmnist_lightning.callbacks.TestReport",
    "fmnist_lightning.checkpoints.SafeCheckpointIO",
)


def copy_of_the_old_run(tiny_data_dir, tmp_path):
    run = tmp_path / "runs" / "base" / "version_0"
    shutil.copytree(FIXTURE, run)
    shutil.copytree(tiny_data_dir, tmp_path / "data")  # the fixture's data_dir, relative to where it runs
    return run


def test_the_fixture_is_what_0_1_0_wrote():
    config = (FIXTURE / "config.yaml").read_text()
    assert all(f"class_path: {name}" in config for name in OLD_CLASS_PATHS)


def test_a_0_1_0_checkpoint_is_tested_with_its_own_numbers(tiny_data_dir, tmp_path):
    run = copy_of_the_old_run(tiny_data_dir, tmp_path)
    result = run_main("test", "--config", str(BASE_CONFIG), "--data.data_dir", "data", "--data.download", "false",
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)  # fmt: skip
    assert "test:             accuracy 0.4900, loss 1.920" in result.stdout  # what 0.1.0 measured (metrics.csv)


@pytest.mark.slow  # a training; the 0.1.0 checkpoint's test is the fast check
def test_a_0_1_0_config_reruns_its_recipe(tiny_data_dir, tmp_path):
    run = copy_of_the_old_run(tiny_data_dir, tmp_path)
    result = run_main("fit", "--config", str(run / "config.yaml"), "--trainer.enable_progress_bar", "false",
                      cwd=tmp_path)  # fmt: skip
    assert "validation:       accuracy 0.3875" in result.stdout  # the same recipe: the same 80 images right
    new_run = tmp_path / "runs" / "base" / "version_1"
    assert (new_run / "accuracy.png").is_file()  # CurvePlots, named by its 0.1.0 path, drew the curves
    new = torch.load(new_run / "checkpoints" / "last.ckpt", weights_only=True)  # through SafeCheckpointIO
    old = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, tensor in old["state_dict"].items():
        # atol 5e-5: the fixture was written on another CPU, whose bf16 units round a last digit differently
        torch.testing.assert_close(new["state_dict"][name], tensor, rtol=1e-3, atol=5e-5)
