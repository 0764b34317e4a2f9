"""The options beyond the original: augmentation, dropout, BatchNorm, label smoothing, schedules, TTA, MobileNetV2."""

import csv
import io
import itertools
import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

from fmnist_lightning.data.augment import BatchAugment, rotate_and_scale
from fmnist_lightning.data.datamodule import FashionMNISTDataModule
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier, warmup_cosine
from fmnist_lightning.network import original_cnn
from helpers import REPO, load_script, read_metrics, run_cli, run_main, tiny_fit_args

IMPROVED = REPO / "configs" / "improved.yaml"


def test_batch_norm_keeps_the_network_under_100k_parameters():
    plain, normed = original_cnn(), original_cnn(batch_norm=True)
    assert sum(p.numel() for p in plain.parameters()) == 93_322
    assert sum(p.numel() for p in normed.parameters()) == 93_642
    assert [name for name, _ in normed.named_children() if name.startswith("batch")] == [
        "batch_normalization",
        "batch_normalization_1",
        "batch_normalization_2",
    ]


def test_dropout_rates_go_where_they_are_asked():
    network = original_cnn(dropout=(0.0, 0.1, 0.2, 0.3))
    rates = {name: layer.p for name, layer in network.named_children() if isinstance(layer, torch.nn.Dropout)}
    assert rates == {"dropout_1": 0.1, "dropout_2": 0.2, "dropout_3": 0.3}
    names = [name for name, _ in network.named_children()]
    assert names.index("dropout_1") == names.index("max_pooling2d_1") + 1
    assert names.index("dropout_3") == names.index("relu_3") + 1
    with pytest.raises(UserError, match="dropout takes 4 rates"):
        FashionMNISTClassifier(dropout=[0.1, 0.2])


def image_batch(count=256):
    images = torch.zeros(count, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 4:12] = 200  # a bright block left of centre
    return images


def test_translation_moves_content_by_at_most_the_shift_and_fills_with_black():
    torch.manual_seed(0)
    shifted = BatchAugment(translate=2)(image_batch())
    assert shifted.dtype == torch.uint8 and shifted.shape == (256, 1, 28, 28)
    for image in shifted[:, 0]:
        rows, cols = (image > 0).nonzero(as_tuple=True)
        assert 8 <= int(rows.min()) <= 12 and 2 <= int(cols.min()) <= 6
        assert int(image.sum()) == 200 * 64  # nothing cut off, nothing added
    offsets = {(int((im[0] > 0).nonzero()[0, 0]), int((im[0] > 0).nonzero()[0, 1])) for im in shifted}
    assert len(offsets) == 25  # every shift in [-2, 2] x [-2, 2] occurs


def test_flip_mirrors_about_half_and_erasing_blanks_patches():
    torch.manual_seed(0)
    flipped = BatchAugment(flip=True)(image_batch())
    mirrored = (flipped[:, 0, 12, 20] == 200).float().mean()
    assert 0.35 < float(mirrored) < 0.65
    ones = torch.full((1000, 1, 28, 28), 255, dtype=torch.uint8)
    erased = BatchAugment(erase=0.5)(ones)
    touched = (erased == 0).flatten(1).any(1).float().mean()
    assert 0.4 < float(touched) < 0.6
    fraction = (erased == 0).flatten(1).float().sum(1)[(erased == 0).flatten(1).any(1)] / 784
    assert float(fraction.min()) >= 0.01 and float(fraction.max()) <= 0.25  # 2-20% of the area, rounded


def test_rotation_and_zoom_turn_and_scale_about_the_centre():
    images = image_batch(3)
    same = rotate_and_scale(images, torch.zeros(3), torch.ones(3))
    assert same.dtype == torch.uint8 and torch.equal(same, images)  # no turn, no zoom: the pixels as they were
    half_turn = rotate_and_scale(images, torch.full((3,), math.pi), torch.ones(3))
    assert (half_turn.int() - images.flip(-1).flip(-2).int()).abs().max() <= 1  # 180 degrees, up to rounding
    square = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    square[..., 10:18, 10:18] = 255
    zoomed = rotate_and_scale(square, torch.zeros(1), torch.full((1,), 2.0))
    assert int((zoomed > 127).sum()) == 16 * 16  # twice as large, still centred
    assert bool((zoomed[..., :4, :] == 0).all()) and bool((zoomed[..., 24:, :] == 0).all())


def test_random_rotation_and_zoom_stay_within_their_ranges():
    torch.manual_seed(0)
    square = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    square[..., 8:20, 8:20] = 255
    areas = (BatchAugment(zoom=0.2)(square) > 127).flatten(1).sum(1).float()
    assert float(areas.min()) >= 144 * 0.8**2 - 10 and float(areas.max()) <= 144 * 1.2**2 + 10
    assert float(areas.std()) > 10  # the scale varies from image to image
    turned = BatchAugment(rotate=15)(square)
    assert not torch.equal(turned, square) and (turned[..., :4, :] == 0).all()  # a small turn keeps the corners away
    with pytest.raises(ValueError, match="rotate must be in"):
        BatchAugment(rotate=200)


def test_augmentation_is_seeded_and_only_applied_while_training(tiny_data_dir):
    dm = FashionMNISTDataModule(
        data_dir=str(tiny_data_dir), download=False, translate=2, flip=True, erase=0.5, rotate=10, zoom=0.1
    )
    batch = (image_batch(8), torch.zeros(8, dtype=torch.long))

    class Trainer:
        training = True

    dm.trainer = Trainer()
    torch.manual_seed(3)
    first = dm.on_after_batch_transfer(batch, 0)[0]
    torch.manual_seed(3)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], first)
    assert not torch.equal(first, batch[0])
    Trainer.training = False  # validation, test, predict
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]


def test_label_smoothing_only_changes_the_training_loss():
    torch.manual_seed(0)
    model = FashionMNISTClassifier(label_smoothing=0.1)
    images, labels = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (16,))
    logits = model(images)
    train_loss = model._shared_step((images, labels), "train")[1]
    val_loss = model._shared_step((images, labels), "val")[1]
    torch.testing.assert_close(train_loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    torch.testing.assert_close(val_loss, F.cross_entropy(logits, labels))


def test_test_time_augmentation_averages_the_mirror_image():
    torch.manual_seed(0)
    model = FashionMNISTClassifier().eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    plain = model.probabilities(images)
    model.test_time_augmentation = True  # what `tta=True` sets
    expected = (plain + model(images.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(model.probabilities(images), expected)


def test_warmup_cosine_schedule_shape():
    factors = [warmup_cosine(10, 110, step) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5)
    assert factors[-1] < 0.001
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_improved_config_trains_with_every_option_and_the_schedule_is_applied(tiny_data_dir, tmp_path):
    logged = io.StringIO()  # Lightning logs the fit-start summary through its own logger's handler
    handler = logging.StreamHandler(logged)
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        result = run_main(
            "fit",
            *tiny_fit_args(tiny_data_dir, epochs=3),
            "--config",
            str(IMPROVED),
            "--trainer.max_epochs=3",
            "--model.dropout=[0.0, 0.1, 0.2, 0.3]",  # the options improved.yaml leaves out, so every one runs
            "--data.flip=true",
            "--data.erase=0.25",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
            "--trainer.callbacks.logging_interval=step",
            "--trainer.log_every_n_steps=1",
            "--test_after_fit=true",
            cwd=tmp_path,
        )
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    summary = result.stdout + logged.getvalue()  # the fit-start summary
    assert "batch_normalization_2" in summary and "dropout_3" in summary
    assert re.search(r"93\.6 K\s+Total params", summary)
    rows = read_metrics(tmp_path / "runs" / "improved" / "version_0")
    rates = [float(row["lr-AdamW"]) for row in rows if row.get("lr-AdamW")]
    assert max(rates) <= 0.005 + 1e-9 and rates[-1] < rates[len(rates) // 2]  # one cycle: up, then down
    assert [row["epoch"] for row in rows if row.get("val_acc")] == ["0", "1", "2"]


def test_tta_switch_for_test(tiny_checkpoint, tiny_data_dir, tmp_path):
    plain = run_main("test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), cwd=tmp_path)
    tta = run_main(
        "test", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), "--model.tta=true", cwd=tmp_path
    )
    scores = [re.search(r"test:\s+accuracy (\S+), loss (\S+)", r.stdout).groups() for r in (plain, tta)]
    assert scores[0] != scores[1]  # reported separately, and it does change the numbers
    # an evaluation setting, not saved: a checkpoint's settings (which LightningCLI puts over the command line)
    # never switch it off
    assert "tta" not in torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]
    assert "trained without data.flip" in tta.stderr and "warning" not in plain.stderr  # mirror images are new to it


def test_mobilenet_v2_from_scratch_and_a_clear_error_for_missing_pretrained_weights(tiny_data_dir, tmp_path):
    model = FashionMNISTClassifier(architecture="mobilenet_v2")
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)
    result = run_main(
        "fit",
        *tiny_fit_args(tiny_data_dir, epochs=1),
        "--model.architecture=mobilenet_v2",
        "--model.pretrained=true",
        "--model.channels_last=false",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "pretrained MobileNetV2 weights are not available" in last and "model.pretrained: false" in last


@pytest.mark.slow  # a dozen runs, each in a process of its own
def test_ablation_script_writes_its_table_and_figure(tiny_data_dir, tmp_path):
    out = tmp_path / "ablation"
    recipes = ["--recipes", "base (the original, 10 epochs)", "+ batch norm"]
    shorter = ["--", "--trainer.max_epochs=1", "--data.batch_size=32", "--data.download=false"]
    options = ["--seeds", "0", "1", "--jobs", "2", "--data-dir", str(tiny_data_dir), "--out", str(out)]
    load_script("ablation").main([*options, *recipes, *shorter])  # here; every run in a process of its own
    with open(out / "ablation.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["recipe"] for row in rows] == ["base (the original, 10 epochs)", "+ batch norm"]
    assert [row["parameters"] for row in rows] == ["93,322", "93,642"]
    assert all(row["seeds"] == "2" and row["epochs"] == "1" and 0 <= float(row["test accuracy"]) <= 1 for row in rows)
    assert (out / "ablation_val_accuracy.png").stat().st_size > 10_000
    summary = (out / "ablation.md").read_text()
    assert "| + batch norm | 2 |" in summary
    assert "Every run also had: `--trainer.max_epochs=1 --data.batch_size=32 --data.download=false`." in summary


def test_ablation_refuses_every_distilled_recipe_without_a_teacher(tmp_path, capsys):
    ablation = load_script("ablation")
    distilled = [recipe for recipe in ablation.RECIPES if recipe.startswith("distilled")]
    assert len(distilled) == 3
    for recipe in distilled:
        with pytest.raises(SystemExit) as exit:
            ablation.main(["--recipes", recipe, "--out", str(tmp_path)])
        assert exit.value.code == 2
        assert "the distilled recipe needs --teacher CKPT" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.real_data
@pytest.mark.slow
def test_improved_recipe_beats_the_base_recipe_at_the_same_short_budget(real_data_dir, tmp_path):
    scores = {}
    for name, extra in (("base", []), ("improved", ["--config", str(IMPROVED)])):
        result = run_cli(
            "fit",
            "--config",
            str(REPO / "configs" / "base.yaml"),
            *extra,
            "--data.data_dir",
            str(real_data_dir),
            "--trainer.max_epochs=5",  # both recipes' schedules fit the budget (one-cycle anneals in 5 epochs)
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=true",
            cwd=tmp_path,
            timeout=900,
        )
        scores[name] = float(re.search(r"test:\s+accuracy (\S+),", result.stdout).group(1))
    assert scores["improved"] > scores["base"], scores


def test_mobilenet_v2_takes_imagenet_weights_from_a_local_file(tmp_path):
    from torchvision.models import mobilenet_v2

    imagenet_like = mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2_imagenet.pt"
    torch.save(imagenet_like, path)
    model = FashionMNISTClassifier(architecture="mobilenet_v2", pretrained=str(path), channels_last=False)
    loaded = model.network.backbone.state_dict()
    assert torch.equal(loaded["features.0.0.weight"], imagenet_like["features.0.0.weight"])
    assert loaded["classifier.1.weight"].shape == (10, 1280)  # a new 10-class layer on top
    assert torch.allclose(model.network.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # ImageNet's statistics
    for bad, message in ((tmp_path / "none.pt", "does not exist"), (_foreign_weights(tmp_path), "does not hold")):
        with pytest.raises(UserError, match=message):
            FashionMNISTClassifier(architecture="mobilenet_v2", pretrained=str(bad))


def _foreign_weights(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    return path
