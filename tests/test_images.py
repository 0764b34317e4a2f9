"""Image files of every kind brought to 28x28 light-on-dark grayscale, and bad files reported, not raised."""

import os
import signal

import numpy as np
import pytest
from PIL import Image

from fmnist_lightning.data.decode import Invert, fit_to_square, has_light_border, load_image
from fmnist_lightning.data.images import iter_image_paths
from helpers import declared_size_png, tiny_split


@pytest.fixture(scope="module")
def garment() -> np.ndarray:
    """A real-looking 28x28 test image: light bar on a dark background."""
    images, _ = tiny_split(per_class=1, seed=3)
    return images[4]


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [
        (".png", "L"),
        (".bmp", "L"),
        (".webp", "L"),
        (".png", "RGB"),
        (".png", "RGBA"),
        (".png", "P"),
        (".tiff", "L"),
    ],
)
def test_lossless_28x28_files_of_any_mode_load_back_exactly(tmp_path, garment, suffix, mode):
    path = tmp_path / f"garment{suffix}"
    image = Image.fromarray(garment).convert(mode)
    image.save(path, **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(load_image(path), garment)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path, garment):
    path = tmp_path / "deep.png"
    Image.fromarray(garment.astype(np.uint16) * 257).save(path)  # 0..65535
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(load_image(path), garment)


def test_jpeg_is_close(tmp_path, garment):
    path = tmp_path / "garment.jpg"
    Image.fromarray(garment).save(path, quality=95)
    assert np.abs(load_image(path).astype(int) - garment).mean() < 3


def test_dark_garment_on_white_is_inverted_by_the_border_rule(tmp_path, garment):
    path = tmp_path / "photo.png"
    Image.fromarray(255 - garment).save(path)
    assert has_light_border(255 - garment)
    np.testing.assert_array_equal(load_image(path), garment)
    np.testing.assert_array_equal(load_image(path, Invert.NEVER), 255 - garment)
    np.testing.assert_array_equal(load_image(tmp_path / "photo.png", Invert.ALWAYS), garment)
    Image.fromarray(garment).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_image(tmp_path / "plain.png", Invert.ALWAYS), 255 - garment)


def test_transparent_background_counts_as_background(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent
    rgba[10:30, 15:25] = (20, 20, 20, 255)  # an opaque dark garment
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = load_image(path)
    assert pixels[0, 0] == 0  # background became black after inversion
    assert pixels[14, 14] > 200  # the garment became light


def test_aspect_ratio_is_kept_by_padding_not_stretching(tmp_path):
    wide = np.full((50, 100), 200, dtype=np.uint8)
    wide[:, :2] = wide[:, -2:] = 0  # dark left/right border, no inversion
    wide[:2, :] = wide[-2:, :] = 0
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    pixels = load_image(path)
    assert pixels.shape == (28, 28)
    assert pixels[:6].max() == 0 and pixels[-6:].max() == 0  # 14 rows of image, 7 of padding each side
    assert pixels[10:18, 5:23].min() > 150
    assert fit_to_square(np.zeros((300, 30), dtype=np.uint8)).shape == (28, 28)


def test_large_images_are_shrunk(tmp_path, garment):
    path = tmp_path / "big.png"
    Image.fromarray(garment).resize((280, 280), Image.Resampling.NEAREST).save(path)
    assert np.abs(load_image(path).astype(int) - garment).mean() < 8


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not an image", "not an image"),
        (b"", "not an image"),
    ],
)
def test_bad_files_raise_a_short_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        load_image(path)


def test_truncated_image_is_refused(tmp_path, garment):
    path = tmp_path / "cut.png"
    Image.fromarray(garment).resize((200, 200)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="unreadable image"):
        load_image(path)


def test_paths_folders_and_globs_are_expanded_lazily_with_problems_reported(tmp_path):
    (tmp_path / "shop" / "shoes").mkdir(parents=True)
    for name in ("a.png", "shoes/b.jpg", "notes.txt"):
        (tmp_path / "shop" / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    sources = [
        str(tmp_path / "shop"),
        str(tmp_path / "shop" / "*.png"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "empty"),
        str(tmp_path / "nothing-*.png"),
    ]
    found = list(iter_image_paths(sources))
    assert found == [
        (str(tmp_path / "shop" / "a.png"), None),
        (str(tmp_path / "shop" / "shoes" / "b.jpg"), None),
        # the glob's shop/a.png was found in the folder already: each file once
        (str(tmp_path / "missing.png"), "no such file or folder"),
        (str(tmp_path / "empty"), "no image files found here"),
        (str(tmp_path / "nothing-*.png"), "no such file or folder"),
    ]


@pytest.fixture
def no_hang():
    """Turn a read that would block forever into a test failure after 20 s."""

    def timed_out(signum, frame):
        raise TimeoutError("blocked: a read that should have been refused")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: (os.mkfifo(tmp / "pipe.png"), tmp / "pipe.png")[1], "not a regular file"),
        (lambda tmp: tmp, "not a regular file"),
        (lambda tmp: declared_size_png(tmp / "bomb.png", 12_000, 9_000), "declares 12000x9000 pixels, over the 64"),
        (lambda tmp: declared_size_png(tmp / "wide.png", 200_000, 400), "over the 64 megapixel limit"),
    ],
    ids=["named pipe", "folder", "108 megapixels in a small file", "80 megapixels"],
)
def test_inputs_that_would_hang_or_explode_are_refused_before_decoding(tmp_path, no_hang, make, reason):
    path = make(tmp_path)
    assert not path.is_file() or path.stat().st_size < 2000
    with pytest.raises(ValueError, match=reason):
        load_image(path)


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, garment, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(garment).save(path)
    monkeypatch.setattr("fmnist_lightning.data.decode.MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError, match=r"file of [\d,]+ bytes, over the"):
        load_image(path)


def shop_with_loops(tmp_path):
    """shop/a.png, shop/shoes/b.png, a link back to shop/ inside shoes/, a hard link and a pipe."""
    shoes = tmp_path / "shop" / "shoes"
    shoes.mkdir(parents=True)
    for path in (tmp_path / "shop" / "a.png", shoes / "b.png"):
        path.write_bytes(b"x")
    (shoes / "back").symlink_to("..")
    (shoes / "loop").symlink_to("loop")  # a link to itself
    os.link(shoes / "b.png", tmp_path / "shop" / "same-as-b.png")
    os.mkfifo(tmp_path / "shop" / "pipe.png")
    return tmp_path / "shop"


@pytest.mark.parametrize(
    "sources",
    [
        ["shop"],
        ["shop/**/*.png"],
        ["shop", "shop/**", "shop/shoes/back/a.png", "shop/a.png"],
    ],
    ids=["folder", "recursive glob", "the same files several ways"],
)
def test_links_loops_and_repeats_give_each_real_file_once(tmp_path, monkeypatch, no_hang, sources):
    shop_with_loops(tmp_path)
    monkeypatch.chdir(tmp_path)
    found = list(iter_image_paths(sources))
    readable = sorted(path for path, problem in found if problem is None)
    assert len(readable) == 2  # a.png, and b.png under one of its two names
    assert readable[0] == "shop/a.png"
    assert readable[1] in ("shop/shoes/b.png", "shop/same-as-b.png")
    problems = [(path, problem) for path, problem in found if problem is not None]
    assert problems == [("shop/pipe.png", "not a regular file (pipe, device or broken link)")]
