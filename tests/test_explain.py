"""`fmnist explain`: Captum's attribution maps for both architectures, the faithfulness checks, the command end to
end and its refusals, on the tiny data."""

import json
import sys
from copy import deepcopy

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.data.datamodule import load_split
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.attributions import attribution_maps, checked_layer, default_layer, feature_map_sides
from fmnist_lightning.reports.explanation_plots import HEATMAP_COLORS, explanation_figure, overlay_rgb
from fmnist_lightning.reports.faithfulness import (
    RANDOMISATION_THRESHOLD,
    area_under,
    deletion_curves,
    measure_faithfulness,
    rank_correlation,
)
from helpers import run_main, stopped_while_drawing

METHODS = ("gradcam", "ig", "occlusion")
ORIGINAL_LAYERS = {"conv2d": 26, "max_pooling2d": 13, "relu": 13, "conv2d_1": 11, "max_pooling2d_1": 5, "relu_1": 5,
                   "conv2d_2": 3, "relu_2": 3}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return FashionMNISTClassifier.from_checkpoint(tiny_checkpoint)[0]


@pytest.fixture(scope="module")
def tiny_test(tiny_data_dir):
    return load_split(tiny_data_dir, train=False)


def predicted(model, images):
    with torch.no_grad():
        return model.probabilities(images).argmax(dim=1)


def test_grad_cam_reads_the_last_feature_map_still_readable_at_28x28():
    original = FashionMNISTClassifier()
    assert feature_map_sides(original.network) == ORIGINAL_LAYERS  # in the order the forward pass finishes them
    assert default_layer(original) == "conv2d_1"  # 11x11; conv2d_2's map is 3x3
    resnet = FashionMNISTClassifier(architecture="resnet")  # ResNet-20: three blocks a stage
    sides = feature_map_sides(resnet.network)
    assert (sides["stem"], sides["stage1_block3"], sides["stage2_block3"], sides["stage3_block3"]) == (28, 28, 14, 7)
    assert sides["stage2_block3.conv2"] == 14 and "dense" not in sides and "pool" in sides  # 1x1, but 4-D
    assert default_layer(resnet) == "stage2_block3"  # the last block of the 14x14 stage
    assert default_layer(FashionMNISTClassifier(architecture="resnet", depth=8)) == "stage2_block1"
    assert checked_layer(original, None) == "conv2d_1" and checked_layer(original, "conv2d") == "conv2d"
    with pytest.raises(UserError, match="--layer 'dense' is not a feature-map layer of this original network; "
                                        "choose one of: conv2d, max_pooling2d, relu, conv2d_1, "):  # fmt: skip
        checked_layer(original, "dense")


@pytest.mark.parametrize("architecture", ["original", "resnet"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_28x28_map_per_image(tiny_model, tiny_test, architecture, method):
    torch.manual_seed(0)  # an untrained ResNet: with some weights Grad-CAM's ReLU leaves a map all zero
    model = tiny_model if architecture == "original" else FashionMNISTClassifier(architecture="resnet", depth=8).eval()
    images = tiny_test.images[:5]
    maps = attribution_maps(model, images, method, predicted(model, images))
    assert maps.shape == (5, 28, 28) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert maps.abs().amax(dim=(1, 2)).min() > 0  # something in every map
    if method == "gradcam":
        assert maps.min() >= 0  # ReLU'd: only evidence for the class
    # floats in [0, 1] are the same pictures as uint8
    same = attribution_maps(model, images.float() / 255, method, predicted(model, images))
    torch.testing.assert_close(same, maps)


def test_the_overlay_colours_the_picture_where_the_map_is_high():
    pixels = np.full((28, 28), 100, dtype=np.uint8)
    heatmap = np.zeros((28, 28))
    heatmap[5, 5], heatmap[6, 6] = 4.0, -3.0  # negative evidence is not drawn
    overlay = overlay_rgb(pixels, heatmap)
    assert overlay.shape == (28, 28, 3) and overlay.dtype == np.uint8
    assert (overlay[0, 0] == 100).all() and (overlay[6, 6] == 100).all()  # the grayscale picture where it is 0
    top = np.array(colormaps[HEATMAP_COLORS](1.0)[:3])  # the top of the colormap at the maximum, 70% opaque
    assert (overlay[5, 5] == np.round((0.3 * 100 / 255 + 0.7 * top) * 255)).all()
    assert (overlay_rgb(pixels, np.zeros((28, 28))) == 100).all()


def test_a_deletion_curve_starts_on_the_intact_image_and_ends_on_a_black_one(tiny_model, tiny_test):
    images = tiny_test.images[:6]
    classes = predicted(tiny_model, images)
    maps = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(1))
    curves = deletion_curves(tiny_model, images, maps, classes, torch.Generator().manual_seed(0), steps=7)
    assert curves.shape == (6, 8)
    with torch.no_grad():
        intact = tiny_model.probabilities(images)[torch.arange(6), classes]
        black = tiny_model.probabilities(torch.zeros(1, 1, 28, 28))[0, classes]
    torch.testing.assert_close(curves[:, 0], intact)
    torch.testing.assert_close(curves[:, -1], black)
    auc = area_under(curves)
    assert ((auc >= 0) & (auc <= 1)).all()
    # a flat map is a random order, the same for the same seed
    flat = torch.zeros_like(maps)
    again = [deletion_curves(tiny_model, images, flat, classes, torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(*again)


@pytest.mark.parametrize("method", METHODS)
def test_the_maps_are_faithful_to_the_trained_model(tiny_model, tiny_test, method):
    classes = predicted(tiny_model, tiny_test.images)
    report = measure_faithfulness(tiny_model, tiny_test.images, classes, method)
    assert report.images == 100 and len(report.attribution_curve) == 29
    # blacking out the most attributed pixels first lowers the predicted class's probability faster than chance
    assert report.deletion_auc < report.random_auc
    # and a re-initialised network's maps share little rank order with the trained one's ...
    assert report.randomisation_passed and report.randomisation_spearman < RANDOMISATION_THRESHOLD
    # ... where the same weights in another copy give the same maps: the measure can see a match
    maps = attribution_maps(tiny_model, tiny_test.images, method, classes)
    copy = attribution_maps(deepcopy(tiny_model), tiny_test.images, method, classes)
    assert rank_correlation(maps, copy).mean() > 0.99


def output_files(folder):
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def run_copy(weak_checkpoint, tmp_path):
    """The weak checkpoint copied into a run folder of its own (explain writes beside it)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "best.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(weak_checkpoint.read_bytes())
    return checkpoint


def test_explain_writes_the_mistakes_pictures_and_the_faithfulness_report(run_copy, tiny_data_dir, tmp_path):
    args = ["--ckpt_path", str(run_copy), "--data.data_dir", str(tiny_data_dir), "--count", "4"]
    result = run_main("explain", *args, "--faithfulness_images", "60", cwd=tmp_path)
    folder = run_copy.parent.parent / "explanations" / "gradcam"
    names = output_files(folder)
    pictures = [name for name in names if name[:2].isdigit()]
    assert len(pictures) == 4 and pictures[0].startswith("01-test-")
    assert names == sorted([*pictures, "deletion_curve.png", "explanations.png", "faithfulness.json"])
    for name in pictures:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (folder / name).stat().st_size > 10_000
    assert (folder / "explanations.png").stat().st_size > 40_000 and (
        folder / "deletion_curve.png"
    ).stat().st_size > 30_000
    report = json.loads((folder / "faithfulness.json").read_text())
    assert report["checkpoint"] == str(run_copy) and (report["method"], report["layer"]) == ("gradcam", "conv2d_1")
    assert report["images"] == 60 and report["deletion_steps"] == 28 and len(report["random_curve"]) == 29
    assert report["auc_difference"] == pytest.approx(report["random_auc"] - report["deletion_auc"])
    assert report["randomisation_passed"] == (report["randomisation_spearman"] < 0.5)
    assert f"explanations:     {folder} (4 pictures of the test set's 4 most confident mistakes" in result.stdout
    assert f"deletion AUC:     {report['deletion_auc']:.3f} in the attribution's order" in result.stdout
    assert f"Spearman {report['randomisation_spearman']:.3f}" in result.stdout
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no temporary folder left


def test_explain_draws_given_pictures_and_overwrites_only_when_asked(run_copy, tiny_test, tmp_path):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"shoe {index}.png")
        Image.fromarray(tiny_test.images[index, 0].numpy()).save(paths[-1])
    out = tmp_path / "out"
    args = ["--ckpt_path", str(run_copy), "--output", str(out), "--faithfulness_images", "0", "--method", "occlusion"]
    result = run_main("explain", *args, "--data.predict_paths", f"[{paths[0]}, {paths[1]}]", cwd=tmp_path)
    assert output_files(out) == ["01-shoe-0.png", "02-shoe-1.png", "explanations.png"]
    assert "(2 pictures of the first 2 files given, and explanations.png)" in result.stdout
    assert "faithfulness:     not checked (--faithfulness_images 0)" in result.stdout
    refused = run_main("explain", *args, "--data.predict_paths", f"[{tmp_path}]", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "out exists; give another --output, or --overwrite true" in refused.stderr
    run_main("explain", *args, "--data.predict_paths", f"[{tmp_path}/*.png]", "--overwrite", "true", cwd=tmp_path)
    assert output_files(out) == ["01-shoe-0.png", "02-shoe-1.png", "03-shoe-2.png", "explanations.png"]


def every_path(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "dense"], "--layer 'dense' is not a feature-map layer of this original network; choose one of: "
                               "conv2d, max_pooling2d, relu, conv2d_1, max_pooling2d_1, relu_1, conv2d_2, relu_2"),
        (["--method", "ig", "--layer", "conv2d"], "--layer is Grad-CAM's; --method ig reads no layer"),
        (["--method", "shap"], "Expected a typing.Literal['gradcam', 'ig', 'occlusion']. Got value: shap"),
        (["--count", "0"], "--count must be between 1 and 100, got 0"),
        (["--count", "many"], "Parser key \"count\": Expected a <class 'int'>. Got value: many"),
        (["--faithfulness_images", "-1"], "--faithfulness_images must be 0 (skip the checks) or more, got -1"),
        (["--data.predict_paths", "[notes.png]"], "--data.predict_paths: notes.png: not an image Pillow can read"),
        (["--data.predict_paths", "[nowhere/]"], "--data.predict_paths: nowhere: no such file or folder"),
        (["--data.predict_paths", "[]"], "--data.predict_paths is an empty list"),
        (["--output", "done"], "done exists; give another --output, or --overwrite true to replace it"),
        (["--output", "done", "--overwrite", "true"], "done holds no explanations.png, so fmnist explain did not "
                                                      "write it; choose another --output"),
        (["--output", "notes.png"], "notes.png is a file; give a folder with --output"),
    ],
    ids=["unknown layer", "layer without gradcam", "unknown method", "count 0", "count not a number",
         "negative faithfulness images", "not an image", "missing file", "no files", "output exists",
         "overwrite a folder explain did not write", "output a file"],
)  # fmt: skip
def test_explain_refuses_bad_input_with_one_line_and_writes_nothing(run_copy, tiny_data_dir, tmp_path, extra, message):
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "kept.txt").write_text("kept")
    before = every_path(tmp_path)
    args = ["--ckpt_path", str(run_copy), "--data.data_dir", str(tiny_data_dir), *extra]
    result = run_main("explain", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1] and result.stderr.startswith("fmnist: error: ")
    assert every_path(tmp_path) == before


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp: ["--ckpt_path", str(tmp / "no.ckpt")], "no.ckpt does not exist"),
        (lambda tmp: ["--ckpt_path", "last", "--runs_dir", str(tmp / "runs")], "no run with a checkpoints/last.ckpt"),
    ],
    ids=["missing checkpoint", "no run for last"],
)
def test_explain_refuses_a_checkpoint_it_cannot_read(tmp_path, make_args, message):
    result = run_main("explain", *make_args(tmp_path), cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr and every_path(tmp_path) == []


def test_explain_finds_the_newest_runs_best_checkpoint(workspace, tiny_test, tmp_path):
    Image.fromarray(tiny_test.images[0, 0].numpy()).save(tmp_path / "shoe.png")
    out = tmp_path / "out"
    args = ["--ckpt_path", "best", "--runs_dir", str(workspace / "runs"), "--output", str(out)]
    run_main("explain", *args, "--data.predict_paths", "[shoe.png]", "--faithfulness_images", "0", cwd=tmp_path)
    assert output_files(out) == ["01-shoe.png", "explanations.png"]


def test_a_model_without_mistakes_is_asked_for_pictures(tiny_checkpoint, tiny_data_dir, tmp_path):
    args = ["--ckpt_path", str(tiny_checkpoint), "--data.data_dir", str(tiny_data_dir), "--output", str(tmp_path / "o")]
    result = run_main("explain", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and every_path(tmp_path) == []
    assert "the model gets all 100 test images right; give pictures with --data.predict_paths" in result.stderr


@pytest.mark.parametrize(("stop", "status", "cause"), [("sigterm", 143, "SIGTERM"), ("ctrl-c", 130, "Ctrl-C")])
def test_explain_stopped_while_writing_leaves_no_folder(run_copy, tiny_data_dir, tmp_path, monkeypatch, stop, status,
                                                       cause):  # fmt: skip
    from fmnist_lightning.reports import plots

    monkeypatch.setattr(plots, "write_figure", stopped_while_drawing(stop))
    before = every_path(tmp_path)
    args = ["--ckpt_path", str(run_copy), "--data.data_dir", str(tiny_data_dir), "--faithfulness_images", "0"]
    result = run_main("explain", *args, cwd=tmp_path, check=False)
    assert result.returncode == status
    assert result.stderr.strip().splitlines() == [f"fmnist: stopped by {cause}; no file was left half-written"]
    assert every_path(tmp_path) == before  # neither the folder, its temporary twin, nor explanations/


def test_without_captum_explain_names_the_extra_to_install(run_copy, tmp_path, monkeypatch):
    for name in ("captum", "captum.attr"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if captum were not installed
    for name in ("fmnist_lightning.commands.explain", "fmnist_lightning.reports.attributions",
                 "fmnist_lightning.reports.faithfulness"):  # fmt: skip
        monkeypatch.delitem(sys.modules, name)
    result = run_main("explain", "--ckpt_path", str(run_copy), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("it comes with an optional part of this project: pip install -e '.[explain]'")


def test_an_image_s_picture_names_its_top_classes_and_its_true_class():
    top = [(CLASS_NAMES[3], 0.7), (CLASS_NAMES[1], 0.2), (CLASS_NAMES[0], 0.1)]
    figure = explanation_figure(
        np.zeros((28, 28), np.uint8), np.zeros((28, 28)), top, "test #1", "Grad-CAM", CLASS_NAMES[1]
    )
    bars = figure.axes[2]
    assert [label.get_text() for label in bars.get_yticklabels()] == [CLASS_NAMES[0], CLASS_NAMES[1], CLASS_NAMES[3]]
    assert bars.get_title() == f"true class: {CLASS_NAMES[1]}"
