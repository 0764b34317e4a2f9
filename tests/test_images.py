"""Image files of every kind brought to 28x28 light-on-dark grayscale, and bad files reported, not raised."""

import numpy as np
import pytest
from PIL import Image

from fmnist_lightning.images import Invert, fit_to_square, has_light_border, iter_image_paths, load_image
from helpers import tiny_split


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
        (str(tmp_path / "shop" / "a.png"), None),
        (str(tmp_path / "missing.png"), "no such file or folder"),
        (str(tmp_path / "empty"), "no image files found here"),
        (str(tmp_path / "nothing-*.png"), "no such file or folder"),
    ]
