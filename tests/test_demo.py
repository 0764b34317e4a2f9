"""`fmnist demo`: the handlers called directly, the refusals before the server starts, and one real browser."""

import csv
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.commands.demo_app import ENLARGE, ScoredTestSet, classify, run_choices, run_curves
from fmnist_lightning.commands.described import describe_checkpoint
from fmnist_lightning.data.datamodule import load_split
from fmnist_lightning.data.decode import load_image
from fmnist_lightning.reports.attributions import attribution_maps
from fmnist_lightning.reports.explanation_plots import overlay_rgb
from helpers import cli_environment, declared_size_png, load_script, run_main, tiny_fit_args, tree_snapshot, wait_for


def dark_shoe_on_white(path):
    """A 60x40 RGB 'photo': a dark shape on a white background, as phone pictures of garments are."""
    pixels = np.full((40, 60, 3), 250, dtype=np.uint8)
    pixels[15:32, 5:55] = (40, 30, 20)
    pixels[8:15, 35:55] = (60, 50, 40)
    Image.fromarray(pixels).save(path)
    return path


def test_the_demo_and_predict_give_the_same_probabilities_for_a_file(tiny_checkpoint, tiny_data_dir, tmp_path):
    photo = dark_shoe_on_white(tmp_path / "shoe.png")
    out = tmp_path / "predictions.csv"
    options = ["--trainer.precision", "32-true", "--predictions.output", str(out), "--predictions.top_k", "10"]
    run_main(
        "predict", *tiny_fit_args(tiny_data_dir), "--ckpt_path", str(tiny_checkpoint), "--data.predict_paths",
        f"[{photo}]", *options, cwd=tmp_path,
    )  # fmt: skip
    with open(out, newline="") as file:
        (row,) = list(csv.DictReader(file))
    expected = {row[f"top{k}_class"]: float(row[f"top{k}_probability"]) for k in range(1, 11)}

    model = describe_checkpoint(tiny_checkpoint).model
    shown, overlay, note, probabilities = classify(model, str(photo))
    assert set(probabilities) == set(CLASS_NAMES)
    for name, value in probabilities.items():
        assert value == pytest.approx(expected[name], abs=1e-6)
    assert np.array_equal(shown[::ENLARGE, ::ENLARGE], load_image(photo))  # what the model received, enlarged
    assert shown.shape == (280, 280)
    assert "inverted: its border was light" in note
    # beside it, `fmnist explain`'s Grad-CAM of the top class over the same picture, enlarged the same way
    pixels = load_image(photo)
    top = CLASS_NAMES.index(max(probabilities, key=probabilities.get))
    heatmap = attribution_maps(model, torch.from_numpy(pixels)[None, None], "gradcam", torch.tensor([top]))[0]
    assert overlay.shape == (280, 280, 3) and overlay.dtype == np.uint8
    assert np.array_equal(overlay[::ENLARGE, ::ENLARGE], overlay_rgb(pixels, heatmap.numpy()))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: None, "Upload a picture or draw one."),
        (
            lambda tmp: (tmp / "notes.png").write_text("not a picture") and tmp / "notes.png",
            "not an image Pillow can read",
        ),
        (lambda tmp: (tmp / "empty.png").write_bytes(b"") or tmp / "empty.png", "not an image Pillow can read"),
        (lambda tmp: _truncated_png(tmp), "unreadable image"),
        (lambda tmp: declared_size_png(tmp / "huge.png", 10_000, 10_000), "over the 64 megapixel limit"),
    ],
    ids=["nothing", "not an image", "empty", "truncated", "huge"],
)
def test_a_bad_upload_gets_a_message_in_the_page(tiny_checkpoint, tmp_path, make, message):
    path = make(tmp_path)
    shown, overlay, note, probabilities = classify(
        describe_checkpoint(tiny_checkpoint).model, str(path) if path else None
    )
    assert shown is None and overlay is None and probabilities is None
    assert message in note


def _truncated_png(tmp_path):
    path = dark_shoe_on_white(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:80])
    return truncated


def test_the_page_says_what_the_checkpoint_is(tiny_checkpoint):
    loaded = describe_checkpoint(tiny_checkpoint)
    assert loaded.recipe == "original network, Adam, the original recipe"
    assert loaded.test_accuracy is None  # its run was not tested


def test_a_confusion_cell_lists_its_images_most_confident_first():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.6, 0.4, 0.0]])
    probabilities = torch.nn.functional.pad(probabilities, (0, 7))  # ten classes
    scored = ScoredTestSet(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 0, 0, 1]), probabilities)
    rows = scored.confusion_rows()
    assert rows[0][:3] == [CLASS_NAMES[0], 1, 2] and rows[1][:3] == [CLASS_NAMES[1], 1, 0]
    assert scored.most_confused() == (CLASS_NAMES[0], CLASS_NAMES[1])  # two of the three mistakes
    items, summary = scored.cell(CLASS_NAMES[0], CLASS_NAMES[1])
    assert [caption for _, caption in items] == ["#2: 90.00%", "#1: 80.00%"]
    assert summary.startswith("2 test images of class T-shirt/top predicted as Trouser (wrong)")


def test_a_mistake_clicked_in_the_gallery_is_explained(tiny_checkpoint, tiny_data_dir):
    model = describe_checkpoint(tiny_checkpoint).model
    test = load_split(tiny_data_dir, train=False)
    probabilities = torch.zeros(len(test.labels), len(CLASS_NAMES))
    probabilities[:, 0] = 0.6  # every image predicted as class 0, image 7 the most confidently
    probabilities[7, 0] = 0.9
    scored = ScoredTestSet(test.images, test.labels, probabilities)
    true_name = CLASS_NAMES[int(test.labels[7])]
    overlay, caption = scored.explained(model, true_name, CLASS_NAMES[0], 0)  # the gallery's first image
    heatmap = attribution_maps(model, test.images[7:8], "gradcam", torch.tensor([0]))[0]
    assert np.array_equal(overlay[::ENLARGE, ::ENLARGE], overlay_rgb(test.images[7, 0].numpy(), heatmap.numpy()))
    assert caption.startswith(
        f"Test image #7: a {true_name} predicted as {CLASS_NAMES[0]} (90.00%). Grad-CAM of conv2d_1"
    )


def test_the_runs_tab_draws_the_chosen_runs(workspace):
    runs = workspace / "runs"
    names = list(run_choices(runs))
    assert names == ["base/version_0"]
    accuracy, loss, note = run_curves(runs, names)
    assert accuracy.axes[0].get_title().startswith("Accuracy per epoch") and loss is not None and note == ""
    assert run_curves(runs, ["base/version_9"])[:2] == (None, None)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, ckpt: ["--ckpt_path", str(tmp / "no.ckpt")], "does not exist"),
        (lambda tmp, ckpt: ["--ckpt_path", "last", "--runs_dir", str(tmp / "runs")], "no run with a checkpoint"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--port", str(_busy_port(tmp))], "cannot serve on 127.0.0.1"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--port", "70000"], "--port must be between 1 and 65535"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--top_k", "0"], "--top_k must be between 1 and 10"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--host", ""], "--host '' is not an address to serve on"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--host", "not a host"], "is not an address to serve on"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--host", "999.1.2.3"], "is not an address to serve on"),
        (lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--host", "http://127.0.0.1"], "is not an address to serve"),
        (
            lambda tmp, ckpt: ["--ckpt_path", str(ckpt), "--host", "192.0.2.1"],  # TEST-NET-1: never this machine's
            "cannot serve on 192.0.2.1:7860: Cannot assign requested address; --host 192.0.2.1 is not an address of "
            "this machine",
        ),
    ],
    ids=[
        "missing checkpoint",
        "no run for last",
        "port in use",
        "port out of range",
        "top_k out of range",
        "empty host",
        "host with spaces",
        "host not an IPv4 address",
        "host a URL",
        "host of another machine",
    ],
)
def test_the_demo_refuses_before_serving(tiny_checkpoint, tmp_path, make_args, message):
    args = make_args(tmp_path, tiny_checkpoint)
    before = tree_snapshot(tmp_path)
    result = run_main("demo", *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert tree_snapshot(tmp_path) == before


BUSY: list[socket.socket] = []


def _busy_port(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    BUSY.append(listener)  # kept open for the test's duration
    return listener.getsockname()[1]


@pytest.mark.browser
@pytest.mark.slow
def test_the_demo_in_a_real_browser(weak_checkpoint, tiny_data_dir, workspace, tmp_path):
    screenshots = load_script("demo_screenshots")  # the same browser steps that take docs/demo_*.png
    try:
        browser = screenshots.chromium_driver()
    except (ImportError, RuntimeError) as error:
        if os.environ.get("FMNIST_REQUIRE_BROWSER"):
            pytest.fail(f"FMNIST_REQUIRE_BROWSER is set, but: {error}")
        pytest.skip(str(error))
    image = load_split(tiny_data_dir, train=False).images[0, 0].numpy()
    picture = tmp_path / "test-image-0.png"
    Image.fromarray(image).save(picture)
    expected = classify(describe_checkpoint(weak_checkpoint).model, str(picture))[3]

    port, scratch = screenshots.free_port(), tmp_path / "scratch"
    scratch.mkdir()
    args = ["--ckpt_path", str(weak_checkpoint), "--port", str(port), "--runs_dir", str(workspace / "runs")]
    server = subprocess.Popen(
        [sys.executable, "-m", "fmnist_lightning", "demo", *args, "--data_dir", str(tiny_data_dir)],
        cwd=tmp_path, env={**cli_environment(), "TMPDIR": str(scratch)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: screenshots.serves(url) or server.poll() is not None, timeout=120, what="the demo to serve")
        assert server.poll() is None, server.stdout.read()
        texts = screenshots.capture(browser, url, picture, tmp_path)
    finally:
        browser.quit()
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert max(expected, key=expected.get) in texts["prediction"].splitlines()[:2]  # the top class, as a heading
    assert "The model sees this 28x28 grayscale image" in texts["Try it"]
    assert "test images of class" in texts["Mistakes"] and "base/version_0" in texts["Runs"]
    # the Grad-CAM overlays: beside the prediction, and of the gallery image clicked in Mistakes
    assert texts["gradcam"] == texts["mistake-gradcam"] == "280x280", texts
    assert texts["mistake-gradcam-note"].startswith("Test image #"), texts
    assert server.returncode == 0, output
    assert list(scratch.iterdir()) == []  # the uploads' folder is gone
    for name in ("try_it.png", "mistakes.png", "runs.png"):
        assert (tmp_path / name).stat().st_size > 10_000
