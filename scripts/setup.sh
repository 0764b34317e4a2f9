#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with the package, and the Fashion-MNIST files.
# Safe to run again: it only does what is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

# The data: already unpacked in data/, the system copy, or (on a machine with internet) torchvision's
# download at the first run. Where none is there and we may use apt, install Debian's package.
system_copy=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ] || [ -f "$system_copy" ]; then
    echo "setup: Fashion-MNIST found"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "setup: could not install dataset-fashion-mnist; the first run will try to download the data"
else
    echo "setup: Fashion-MNIST not installed; the first run downloads it (needs internet)," \
         "or install it with: sudo apt-get install dataset-fashion-mnist"
fi
echo "setup: done (.venv/bin/fmnist is ready)"
