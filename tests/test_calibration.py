"""Probabilities that mean what they say: float32 under bf16, the calibration report, `fmnist calibrate`."""

import csv
import hashlib
import json
import math
import signal

import pytest
import torch

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.export import export_checkpoint
from fmnist_lightning.data.datamodule import load_split
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.calibration import CalibrationMetric, fit_temperature, summarize
from fmnist_lightning.reports.callbacks import percent
from helpers import run_main, stopped_while_drawing, tiny_fit_args, tree_snapshot


def test_calibration_numbers_match_a_hand_computed_example():
    probabilities = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # confidence 0.90, right; bin 14 of 15 (0.867-0.933)
            [0.90, 0.05, 0.05],  # confidence 0.90, wrong; same bin
            [0.20, 0.50, 0.30],  # confidence 0.50, right; bin 8 (0.467-0.533)
            [0.62, 0.28, 0.10],  # confidence 0.62, wrong; bin 10 (0.600-0.667)
        ]
    )
    labels = torch.tensor([0, 1, 1, 2])
    metric = CalibrationMetric(num_classes=3)
    metric.update(probabilities[:2], labels[:2])  # in two batches, as during a test
    metric.update(probabilities[2:], labels[2:])
    summary = metric.compute()
    # ECE: sum over bins of |accuracy - confidence| x share of images
    assert summary.ece == pytest.approx(abs(0.5 - 0.9) * 2 / 4 + abs(1 - 0.5) / 4 + abs(0 - 0.62) / 4, abs=1e-6)
    assert summary.mce == pytest.approx(0.62, abs=1e-6)
    assert summary.nll == pytest.approx(-(math.log(0.9) + math.log(0.05) + math.log(0.5) + math.log(0.1)) / 4, abs=1e-6)
    squared_errors = [
        0.1**2 + 2 * 0.05**2,
        0.9**2 + 0.95**2 + 0.05**2,
        0.2**2 + 0.5**2 + 0.3**2,
        0.62**2 + 0.28**2 + 0.9**2,
    ]
    assert summary.brier == pytest.approx(sum(squared_errors) / 4, abs=1e-6)
    assert summary.accuracy == 0.5
    assert {i: int(n) for i, n in enumerate(summary.bins["images"].tolist()) if n} == {13: 2, 7: 1, 9: 1}
    assert summary.bins["correct"][13] == 1 and summary.bins["confidence"][9] == pytest.approx(0.62)


def test_temperature_scaling_cools_an_over_confident_model():
    generator = torch.Generator().manual_seed(0)
    calibrated_logits = torch.randn(8000, 10, generator=generator) * 2
    labels = torch.multinomial(calibrated_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    over_confident = calibrated_logits * 4  # labels drawn from softmax(z); the model says softmax(4 z)
    temperature = fit_temperature(over_confident[:4000], labels[:4000])  # fitted on one half, judged on the other
    assert 3.6 < temperature < 4.4
    before = summarize(over_confident[4000:].softmax(dim=1), labels[4000:])
    after = summarize((over_confident[4000:] / temperature).softmax(dim=1), labels[4000:])
    assert after.accuracy == before.accuracy  # a temperature never changes the predicted class
    assert after.ece < before.ece / 4 and after.nll < before.nll


def test_predict_under_bf16_writes_float32_probabilities(tiny_checkpoint, tiny_data_dir, tmp_path):
    out = tmp_path / "predictions.csv"
    run_main(
        "predict", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), "--trainer.precision",
        "bf16-mixed", "--predictions.output", str(out), "--predictions.top_k", "10", cwd=tmp_path,
    )  # fmt: skip
    with open(out, newline="") as file:
        rows = list(csv.DictReader(file))
    model, _ = FashionMNISTClassifier.from_checkpoint(tiny_checkpoint)
    images = load_split(tiny_data_dir, train=False).images
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed runs the network in
        expected = model(images).float().softmax(dim=1)
    assert len(rows) == len(images) == 100
    for row in rows:
        index = int(row["path"].removeprefix("test/"))
        found = {CLASS_NAMES.index(row[f"top{k}_class"]): float(row[f"top{k}_probability"]) for k in range(1, 11)}
        assert sum(found.values()) == pytest.approx(1, abs=1e-5)
        for cls, value in found.items():
            assert value == pytest.approx(float(expected[index, cls]), abs=1e-6)  # the CSV keeps 6 decimals
    distinct = {row["probability"] for row in rows}
    assert len(distinct) > 90  # not a handful of bf16 steps


def test_a_confidence_below_one_is_never_shown_as_100_percent():
    assert [percent(p) for p in (0.5, 0.9996, 0.99996, 1.0)] == ["50.0%", "99.96%", "99.996%", "100.0%"]


def test_calibrate_end_to_end_and_every_command_uses_the_temperature(tiny_checkpoint, tiny_data_dir, tmp_path):
    checkpoint = tmp_path / "run" / "best.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = run_main("calibrate", "--ckpt_path", str(checkpoint), "--data_dir", str(tiny_data_dir), cwd=tmp_path)
    calibrated = tmp_path / "run" / "best-calibrated.ckpt"
    assert f"calibrated:       {calibrated}" in result.stdout
    assert (tmp_path / "run" / "best-calibrated.png").stat().st_size > 20_000
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest  # the old one is never changed
    temperature = torch.load(calibrated, weights_only=True)["hyper_parameters"]["temperature"]
    assert f"temperature:      {temperature:.4f} (fitted on 80 validation images)" in result.stdout
    before, after = (line for line in result.stdout.splitlines() if line.startswith("test "))
    assert before.split(",")[0].split()[-1] == after.split(",")[0].split()[-1]  # same accuracy
    after_nll = float(after.split("NLL ")[1].split(",")[0])

    # test (in fp32, as calibrate measures) scores the calibrated probabilities and reports their calibration
    args = [*tiny_fit_args(tiny_data_dir), "--trainer.precision", "32-true"]
    tested = run_main("test", *args, "--ckpt_path", str(calibrated), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "base" / "version_0"
    summary = next(line for line in tested.stdout.splitlines() if line.startswith("test:"))
    assert float(summary.split("loss ")[1].split(",")[0]) == pytest.approx(after_nll, abs=2e-4)
    assert f"ECE {float(after.split('ECE ')[1].split(',')[0]):.4f}" in summary
    with open(run_dir / "calibration.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["bin", "lower", "upper", "images", "mean_confidence", "accuracy"]
    assert sum(int(row[3]) for row in rows[1:16]) == 100
    assert rows[17] == ["metric", "value"] and rows[18][0] == "ece (15 bins)"
    assert (run_dir / "calibration.png").stat().st_size > 20_000

    # export carries it too, and says so
    model_path, metadata_path, _ = export_checkpoint(
        calibrated, "torchscript", tmp_path / "m.pt", data_dir=tiny_data_dir
    )
    assert json.loads(metadata_path.read_text())["temperature"] == pytest.approx(temperature)
    images = load_split(tiny_data_dir, train=False).images[:8]
    model, _ = FashionMNISTClassifier.from_checkpoint(checkpoint)
    with torch.no_grad():
        expected = (model(images) / temperature).softmax(dim=1)
        found = torch.jit.load(str(model_path))(images)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, ckpt, data: ["--ckpt_path", str(_foreign(tmp))], "is not a Lightning checkpoint"),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(ckpt)], "is the checkpoint being"),
        (
            lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--data_dir", str(_test_files_only(tmp, data)),
                                     "--system_dir", str(tmp / "no-system-copy")],
            "Fashion-MNIST",
        ),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(ckpt.parent / ".." / ckpt.parent.name
                                                                           / ckpt.name)], "is the checkpoint being"),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(_linked_folder(tmp, ckpt) / ckpt.name)],
         "is the checkpoint being"),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(tmp / "model.png")],
         "a calibrated checkpoint is a .ckpt file (its diagrams go beside it as model.png)"),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(_existing(tmp / "out.ckpt"))],
         "out.ckpt exists (--output); give another --output, or --overwrite true to replace it"),
        (lambda tmp, ckpt, data: ["--ckpt_path", str(ckpt), "--output", str(_existing(tmp / "out.png").with_suffix(
            ".ckpt"))], "out.png exists (its diagrams); give another --output, or --overwrite true"),
    ],
    ids=["not this project's checkpoint", "output over its own checkpoint", "no training files",
         "output over its own checkpoint through ..", "output over its own checkpoint through a linked folder",
         "output named like its diagrams", "output exists", "diagrams exist"],
)  # fmt: skip
def test_calibrate_refuses_bad_input_with_one_line(tiny_checkpoint, tiny_data_dir, tmp_path, make_args, message):
    args = make_args(tmp_path, tiny_checkpoint, tiny_data_dir)
    before = tree_snapshot(tmp_path)
    result = run_main("calibrate", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert tree_snapshot(tmp_path) == before


def _foreign(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def _test_files_only(tmp_path, data_dir):
    raw = tmp_path / "partial" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (data_dir / "FashionMNIST" / "raw").glob("t10k-*"):
        (raw / source.name).write_bytes(source.read_bytes())
    return tmp_path / "partial"


def _linked_folder(tmp_path, checkpoint):
    (tmp_path / "link").symlink_to(checkpoint.parent, target_is_directory=True)
    return tmp_path / "link"


def _existing(path):
    path.write_bytes(b"kept")
    return path


@pytest.mark.parametrize(("stop", "status", "cause"), [("sigterm", 143, "SIGTERM"), ("ctrl-c", 130, "Ctrl-C")])
def test_calibrate_stopped_while_writing_leaves_nothing_half_written(
    tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch, stop, status, cause
):
    from fmnist_lightning.reports import plots

    monkeypatch.setattr(plots, "write_figure", stopped_while_drawing(stop))
    checkpoint = tmp_path / "run" / "best.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    before = tree_snapshot(tmp_path)
    result = run_main("calibrate", "--ckpt_path", str(checkpoint), "--data_dir", str(tiny_data_dir), cwd=tmp_path,
                      check=False)  # fmt: skip
    assert result.returncode == status
    assert result.stderr.strip().splitlines() == [f"fmnist: stopped by {cause}; no file was left half-written"]
    assert tree_snapshot(tmp_path) == before and sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.ckpt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone with it


@pytest.mark.slow  # three calibrations; the refusal itself is a fast case above
def test_calibrate_overwrite_replaces_its_own_earlier_output(tiny_checkpoint, tiny_data_dir, tmp_path):
    args = ["calibrate", "--ckpt_path", str(tiny_checkpoint), "--data_dir", str(tiny_data_dir)]
    output = ["--output", str(tmp_path / "calibrated.ckpt")]
    run_main(*args, *output, cwd=tmp_path)
    again = run_main(*args, *output, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "calibrated.ckpt exists (--output)" in again.stderr
    run_main(*args, *output, "--overwrite", "true", cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated.ckpt", "calibrated.png"]
