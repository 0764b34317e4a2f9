"""`predict` on the test set and on image files: rows, top-k, bad files, streaming output, exit status."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from fmnist_lightning import CLASS_NAMES
from fmnist_lightning.data.datamodule import load_split
from helpers import declared_size_png, run_main, tiny_fit_args


def predict(tmp_path, data_dir, checkpoint, *extra, check=True):
    return run_main(
        "predict", *tiny_fit_args(data_dir), "--ckpt_path", str(checkpoint), *extra, cwd=tmp_path, check=check
    )


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def test_set_rows(tiny_data_dir, tiny_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("predict-test-set")
    out = workdir / "test_set.csv"
    predict(workdir, tiny_data_dir, tiny_checkpoint, "--predictions.output", str(out))
    return read_rows(out)


def test_test_set_predictions_have_true_labels_and_ranked_top_k(test_set_rows, tiny_data_dir):
    labels = load_split(tiny_data_dir, train=False).labels.tolist()
    assert [row["path"] for row in test_set_rows] == [f"test/{i}" for i in range(100)]
    assert [int(row["true_index"]) for row in test_set_rows] == labels
    for row in test_set_rows:
        assert row["predicted_class"] == CLASS_NAMES[int(row["predicted_index"])] == row["top1_class"]
        ranked = [float(row[f"top{k}_probability"]) for k in (1, 2, 3)]
        assert ranked == sorted(ranked, reverse=True)
        assert float(row["probability"]) == ranked[0]
        assert row["true_class"] == CLASS_NAMES[int(row["true_index"])]
        assert row["error"] == ""


def test_pngs_of_the_test_images_get_the_same_predictions_as_the_tensors(
    test_set_rows, tiny_data_dir, tiny_checkpoint, tmp_path
):
    images = load_split(tiny_data_dir, train=False).images[:, 0].numpy()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    out = tmp_path / "files.csv"
    predict(
        tmp_path,
        tiny_data_dir,
        tiny_checkpoint,
        "--data.predict_paths",
        f"[{folder}]",
        "--predictions.output",
        str(out),
    )
    from_files = {int(row["path"].rsplit("/", 1)[1][:3]): row for row in read_rows(out)}
    assert len(from_files) == 100
    for index, row in enumerate(test_set_rows):
        assert from_files[index]["predicted_index"] == row["predicted_index"]
        assert float(from_files[index]["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)
        assert from_files[index]["true_index"] == ""


def test_bad_files_are_reported_and_the_rest_predicted(tiny_data_dir, tiny_checkpoint, tmp_path):
    shop = tmp_path / "shop"
    (shop / "sub").mkdir(parents=True)
    garment = load_split(tiny_data_dir, train=False).images[0, 0].numpy()
    Image.fromarray(garment).save(shop / "good.png")
    Image.fromarray(255 - garment).convert("RGB").resize((56, 56)).save(shop / "sub" / "photo.jpg")
    (shop / "text.png").write_text("not an image")
    (shop / "empty.jpg").write_bytes(b"")
    os.mkfifo(shop / "pipe.png")  # reading it would block forever
    declared_size_png(shop / "bomb.png", 12_000, 9_000)  # 108 megapixels in a few hundred bytes
    (shop / "sub" / "back").symlink_to("..")  # a loop
    (tmp_path / "nothing").mkdir()
    out = tmp_path / "out.jsonl"
    result = predict(
        tmp_path, tiny_data_dir, tiny_checkpoint,
        "--data.predict_paths", f"[{shop}, {tmp_path / 'nothing'}, {tmp_path / 'missing.png'}, {shop}/**/*.png]",
        "--predictions.output", str(out),
        "--predictions.format", "jsonl",
    )  # fmt: skip
    lines = out.read_text().splitlines()
    rows = {row["path"].replace(str(tmp_path) + "/", ""): row for row in map(json.loads, lines)}
    assert len(rows) == len(lines)  # each file once, whatever reaches it twice (the glob, the loop)
    assert set(rows) == {
        "shop/good.png",
        "shop/sub/photo.jpg",
        "shop/text.png",
        "shop/empty.jpg",
        "shop/pipe.png",
        "shop/bomb.png",
        "nothing",
        "missing.png",
    }
    assert rows["shop/pipe.png"]["error"] == "not a regular file (pipe, device or broken link)"
    assert rows["shop/bomb.png"]["error"].startswith("image declares 12000x9000 pixels, over the 64 megapixel")
    assert rows["shop/text.png"]["error"] == "not an image Pillow can read"
    assert rows["shop/empty.jpg"]["error"] == "not an image Pillow can read"
    assert rows["nothing"]["error"] == "no image files found here"
    assert rows["missing.png"]["error"] == "no such file or folder"
    for good in ("shop/good.png", "shop/sub/photo.jpg"):
        assert rows[good]["error"] == ""
        assert rows[good]["predicted_class"] in CLASS_NAMES
        assert len([key for key in rows[good] if key.endswith("_class") and key.startswith("top")]) == 3
    assert "(2 predicted, 6 could not be read (see the error column))" in result.stdout
    assert "Couldn't infer" not in result.stderr  # no warning a user cannot act on


def test_nothing_predictable_exits_non_zero_and_writes_nothing(tiny_data_dir, tiny_checkpoint, tmp_path):
    (tmp_path / "junk.png").write_text("junk")
    result = predict(
        tmp_path, tiny_data_dir, tiny_checkpoint, "--data.predict_paths", f"[{tmp_path / 'junk.png'}]", check=False
    )
    assert result.returncode == 2
    assert "nothing could be predicted" in result.stderr.strip().splitlines()[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junk.png"]  # no predictions file, no run folder


def test_default_output_is_the_run_folder(tiny_data_dir, tiny_checkpoint, tmp_path):
    result = predict(tmp_path, tiny_data_dir, tiny_checkpoint)
    written = next(line for line in result.stdout.splitlines() if line.startswith("predictions:"))
    path = tmp_path / written.split()[1]
    assert path.name == "predictions.csv"
    assert len(read_rows(path)) == 100
    assert np.isclose(
        sum(float(row["top1_probability"]) >= float(row["top2_probability"]) for row in read_rows(path)), 100
    )
