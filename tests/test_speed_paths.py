"""The fast paths: data cut on the device, channels_last, compile, bf16, and the benchmark script."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.training import speed
from helpers import load_script


def datamodule_on(device: str, data_dir) -> FashionMNISTDataModule:
    """A DataModule set up as a Trainer on `device` would set it up (the meta device stands in for a GPU)."""
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=16, eval_batch_size=16)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_splits_move_to_the_accelerator_once_and_batches_are_cut_there(tiny_data_dir):
    dm = datamodule_on("meta", tiny_data_dir)
    for split in (dm.train_set, dm.val_set, dm.test_set):
        assert split.images.device.type == "meta"
        assert split.images.dtype == torch.uint8  # 1 byte per pixel on the device
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        images, labels = next(iter(loader))
        assert (images.device.type, labels.device.type) == ("meta", "meta")  # no host copy per batch
        assert images.shape == (16, 1, 28, 28)


def test_data_on_device_can_be_turned_off(tiny_data_dir):
    dm = FashionMNISTDataModule(data_dir=str(tiny_data_dir), download=False, data_on_device=False)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.setup("fit")
    assert dm.train_set.images.device.type == "cpu"


def test_channels_last_computes_the_same_logits():
    torch.manual_seed(0)
    nchw = FashionMNISTClassifier(channels_last=False).eval()
    nhwc = FashionMNISTClassifier(channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(nhwc(images), nchw(images), rtol=1e-4, atol=1e-5)
    assert nhwc.network.conv2d_1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("compile", [True, "reduce-overhead"])
def test_compile_switch_keeps_checkpoints_interchangeable(compile):
    assert FashionMNISTClassifier(compile=compile).state_dict().keys() == FashionMNISTClassifier().state_dict().keys()


def test_bf16_autocast_predictions_agree_with_fp32():
    torch.manual_seed(0)
    model = FashionMNISTClassifier(channels_last=True).eval()
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images).float()
    torch.testing.assert_close(low, model(images), rtol=0.05, atol=0.05)


@pytest.mark.slow  # eight short trainings, each in a process of its own
def test_benchmark_runs_every_pipeline_on_tiny_data(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 5 training steps per epoch, handed over after steps 2 and 4: three turns per pipeline and epoch
    flags = ["--data-dir", str(tiny_data_dir), "--epochs", "2", "--turn-steps", "2", "--json", str(out)]
    load_script("benchmark").main(flags)  # here; each pipeline still runs in a process of its own
    result = capsys.readouterr()
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"a_same", "a_default", "b", "c"}
    assert result.err.count("benchmark: round") == 2
    for pipeline in report["results"].values():
        assert len(pipeline["epochs"]) == 2  # one per round
        assert all(epoch["epoch_seconds"] >= epoch["train_seconds"] > 0 for epoch in pipeline["epochs"])
        assert pipeline["train_images"] == 320
        assert pipeline["peak_rss_mb"] > 50
        assert 0 <= pipeline["last_val_acc"] <= 1
    assert set(report["ratios"]) == {
        "a_same / b (epoch time, same settings)",
        "a_default / b (epoch time)",
        "a_default / b (peak memory)",
        "c / a_default (epoch time)",
    }
    # one measured round (round 0 is the warm-up), reported as the median and as the round's own ratio
    rounds = report["round_ratios"]
    assert set(rounds) == set(report["ratios"]) - {"a_default / b (peak memory)"}
    for label, values in rounds.items():
        assert len(values) == 1
        assert report["ratios"][label] == pytest.approx(values[0])
    same = rounds["a_same / b (epoch time, same settings)"][0]
    assert f"| a_same / b (epoch time, same settings) | {same:.3f} | {same:.3f}-{same:.3f} |" in result.out


@pytest.mark.parametrize(
    ("accelerator", "cuda", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("auto", False, False, True, "bf16-mixed"),  # a CPU with AVX-512 BF16 / AMX
        ("auto", False, False, False, "32-true"),  # an AVX2-only CPU emulates bf16, over ten times slower
        ("cpu", True, True, False, "32-true"),  # the CPU asked for on a GPU machine
        ("auto", True, True, False, "bf16-mixed"),
        ("gpu", True, False, True, "32-true"),  # a GPU without bf16
        ("mps", False, False, True, "32-true"),
    ],
)
def test_unset_precision_is_bf16_only_where_the_hardware_computes_bf16(
    monkeypatch, accelerator, cuda, cuda_bf16, cpu_bf16, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(speed, "cpu_computes_bf16", lambda: cpu_bf16)
    assert speed.fastest_precision(accelerator) == expected


@pytest.mark.parametrize(
    ("setting", "library_loads", "expected_setting"),
    [
        ("1", False, "0"),  # Lightning's NVML check on a machine without the NVIDIA driver: the plain check
        ("1", True, "1"),  # the driver is there: Lightning's fork-safe check stays
        (None, False, None),  # nobody asked for NVML: nothing to change
    ],
)
def test_the_nvml_check_is_dropped_only_where_the_library_is_missing(
    monkeypatch, setting, library_loads, expected_setting
):
    def load(name):
        if not library_loads:
            raise OSError(f"{name}: cannot open shared object file")

    if setting is None:
        monkeypatch.delenv(speed.NVML_CHECK_ENV, raising=False)
    else:
        monkeypatch.setenv(speed.NVML_CHECK_ENV, setting)
    monkeypatch.setattr(speed.ctypes, "CDLL", load)
    assert speed.skip_missing_nvml() == (setting != expected_setting)
    assert speed.os.environ.get(speed.NVML_CHECK_ENV) == expected_setting


def test_skipping_a_missing_nvml_keeps_the_answer_about_gpus(monkeypatch):
    monkeypatch.setenv(speed.NVML_CHECK_ENV, "1")
    through_nvml = torch.cuda.is_available()
    speed.skip_missing_nvml()
    assert torch.cuda.is_available() == through_nvml


def test_benchmark_refuses_a_negative_turn_length(capsys):
    benchmark = load_script("benchmark")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--turn-steps", "-1"])
    assert exit_info.value.code == 2
    assert "--turn-steps takes 0 (whole epochs) or a number of steps, got -1" in capsys.readouterr().err


@pytest.mark.slow  # three whole fit commands in processes of their own
def test_benchmark_times_whole_commands_against_the_keras_script(tiny_data_dir, tmp_path, capsys):
    keras = tmp_path / "keras-python"  # stands in for a Python with TensorFlow: two epochs and a result
    keras.write_text(
        f"#!{sys.executable}\n"
        'print(\'BENCHMARK-EPOCH {"epoch_seconds": 2.0, "train_seconds": 2.0}\')\n'
        'print(\'BENCHMARK-EPOCH {"epoch_seconds": 4.0, "train_seconds": 4.0}\')\n'
        'print(\'BENCHMARK-RESULT {"test_acc": 0.9, "test_loss": 0.3}\')\n'
    )
    keras.chmod(0o755)
    out = tmp_path / "whole.json"
    flags = ["--whole-command", "--data-dir", str(tiny_data_dir), "--epochs", "1", "--pairs", "1"]
    load_script("benchmark").main(
        [*flags, "--background-load", "0", "1", "--keras-python", str(keras), "--json", str(out)]
    )
    report = capsys.readouterr().out
    results = json.loads(out.read_text())["whole_command"]
    assert set(results) == {"0", "1"} and set(results["0"]) == {"keras", "base"}
    for load in ("0", "1"):
        ours, theirs = results[load]["base"][0], results[load]["keras"][0]
        assert ours["wall_seconds"] > ours["epoch_seconds"] > 0 and ours["cpu_seconds"] > 0
        assert ours["peak_rss_mb"] > 100 and 0 <= ours["test_acc"] <= 1
        assert theirs["epoch_seconds"] == 3.0 and theirs["test_acc"] == 0.9  # the median of its two epochs
    ratio = results["0"]["base"][0]["epoch_seconds"] / 3.0
    assert f"| fmnist base / keras, s / epoch, load 0 | {ratio:.3f} ({ratio:.3f}-{ratio:.3f}) |" in report
    assert "| base s / epoch, load 1 / load 0 |" in report


@pytest.mark.slow  # a whole fit command
def test_the_speed_run_is_timed_with_a_seed_per_pair_and_a_test_curve(tiny_data_dir, tmp_path):
    benchmark = load_script("benchmark")
    flags = ["--whole-command", "--data-dir", str(tiny_data_dir), "--keras-python", "", "--test-each-epoch"]
    options = benchmark.parse_args([*flags, "--recipes", "speedrun", "--seeds", "7"])
    assert options.pairs == 1 and options.epochs is None  # the recipe's own epochs
    [run] = benchmark.run_whole_commands(options)["0"]["speedrun"]
    assert [point["test_acc"] for point in run["curve"]][-1] == pytest.approx(run["test_acc"], abs=1e-4)
    assert len(run["curve"]) == 3  # configs/speedrun.yaml's epochs
    assert 0 < run["curve"][0]["seconds"] < run["curve"][-1]["seconds"] < run["wall_seconds"]


def test_only_recipes_other_than_base_get_the_pair_seed():
    benchmark = load_script("benchmark")
    options = benchmark.parse_args(["--whole-command", "--recipes", "base", "speedrun", "--seeds", "3", "4"])
    assert options.pairs == 2
    assert benchmark.seeded("speedrun", ["fit"], options, 1) == ["fit", "--seed_everything", "4"]
    assert benchmark.seeded("base", ["fit"], options, 1) == ["fit"]  # its reference numbers come from seed 42


def test_the_benchmark_refuses_a_recipe_without_a_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("benchmark").parse_args(["--whole-command", "--recipes", "fastest"])
    assert exit_info.value.code == 2
    assert "--recipes fastest: no configs/fastest.yaml" in capsys.readouterr().err


def test_time_to_accuracy_reads_the_first_epoch_at_each_level():
    curves = load_script("time_to_accuracy")
    run = {"wall_seconds": 30.0, "test_acc": 0.905, "curve": [
        {"seconds": 10.0, "test_acc": 0.88}, {"seconds": 18.0, "test_acc": 0.901}, {"seconds": 26.0, "test_acc": 0.921},
    ]}  # fmt: skip
    assert curves.seconds_to(run["curve"], 0.90) == 18.0 and curves.seconds_to(run["curve"], 0.93) is None
    assert "| speedrun | 30.0 | 0.9050 | 18.0 | 26.0 | - |" in curves.report({"speedrun": run})
