"""The original Keras script, written from its README, as the benchmark's reference (`scripts/benchmark.py
--whole-command`). Needs a Python with TensorFlow, kept apart from the project's environment:

    python3 -m venv .venv-keras && .venv-keras/bin/pip install tensorflow-cpu
    .venv-keras/bin/python scripts/keras_original.py --data-dir data

The network (Conv2D 32, MaxPool, Conv2D 64, MaxPool, Conv2D 64, Flatten, Dense 64, Dense 10 softmax: 93,322
parameters), Adam, batch 64, 10 epochs, 20% of the training set held out by `validation_split`, then the test
set evaluated. It reads torchvision's raw IDX files (no download) and prints one line per epoch and a result
line in the benchmark's format.
"""

import argparse
import json
import os
import struct
import time
from pathlib import Path

import numpy as np

EPOCH, RESULT, CURVE = "BENCHMARK-EPOCH", "BENCHMARK-RESULT", "BENCHMARK-CURVE"
START_ENV = "BENCHMARK_START"  # time.time() when the benchmark launched this process


def read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    dims = struct.unpack(f">{data[3]}I", data[4 : 4 + 4 * data[3]])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="torchvision's layout: DIR/FashionMNIST/raw/")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--test-each-epoch",
        action="store_true",
        help="also score the test set after each epoch (time-to-accuracy curve; its own time is left out)",
    )
    options = parser.parse_args()
    raw = Path(options.data_dir) / "FashionMNIST" / "raw"

    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras import layers

    x_train = read_idx(raw / "train-images-idx3-ubyte")[..., None].astype("float32") / 255
    y_train = read_idx(raw / "train-labels-idx1-ubyte")
    x_test = read_idx(raw / "t10k-images-idx3-ubyte")[..., None].astype("float32") / 255
    y_test = read_idx(raw / "t10k-labels-idx1-ubyte")

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class EpochClock(keras.callbacks.Callback):
        """Each epoch's seconds; with --test-each-epoch, also the test accuracy against the seconds since launch,
        leaving out the time the extra test passes take (they are measurement, not training)."""

        measuring = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.start
            print(f"{EPOCH} {json.dumps({'epoch_seconds': seconds, 'train_seconds': seconds})}", flush=True)
            if options.test_each_epoch:
                elapsed = time.time() - float(os.environ.get(START_ENV, time.time())) - self.measuring
                start = time.perf_counter()
                accuracy = self.model.evaluate(x_test, y_test, verbose=0, batch_size=500)[1]
                self.measuring += time.perf_counter() - start
                print(f"{CURVE} {json.dumps({'seconds': elapsed, 'test_acc': float(accuracy)})}", flush=True)

    model.fit(
        x_train,
        y_train,
        epochs=options.epochs,
        batch_size=64,
        validation_split=0.2,
        callbacks=[EpochClock()],
        verbose=0,
    )
    test_loss, test_acc = model.evaluate(x_test, y_test, verbose=0)
    result = {"test_acc": float(test_acc), "test_loss": float(test_loss), "parameters": model.count_params()}
    print(f"{RESULT} {json.dumps({**result, 'tensorflow': tf.__version__})}", flush=True)


if __name__ == "__main__":
    main()
