"""The plain nn.Modules: input scaling and the original Keras network.

Layer names follow the Keras summary of the original script (conv2d, max_pooling2d, conv2d_1, ...), so
the summary Lightning prints at fit start reads like the one the original printed.
"""

from collections import OrderedDict

import torch
from torch import nn

# Mean and standard deviation of the 60,000 official training images, pixels in [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class InputScaling(nn.Module):
    """uint8 pixels (or floats already in [0, 1]) to the float input the network was trained on.

    Living in the model rather than in the data pipeline means a checkpoint or an exported model
    carries its own preprocessing: callers only ever hand it 28x28 grayscale pixels.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else (0.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if self.normalize:
            images = (images - self.mean) / self.std
        return images

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


def original_cnn(num_classes: int = 10, pool_before_relu: bool = False) -> nn.Sequential:
    """Conv(32) pool Conv(64) pool Conv(64) Dense(64) Dense(10): the Keras original, 93,322 parameters.

    It returns logits; the softmax of the original's last layer is folded into the loss (cross-entropy
    on logits) and applied where probabilities are returned.

    `pool_before_relu` max-pools each of the first two convolutions before its ReLU instead of after.
    The network computes exactly the same function and gradients (max and ReLU commute:
    max(relu(a), relu(b)) = relu(max(a, b))), with 4x less ReLU work; layer names, shapes, parameters
    and checkpoints are unchanged.
    """
    blocks = []
    for index, (conv, pool) in enumerate(
        ((nn.Conv2d(1, 32, kernel_size=3), nn.MaxPool2d(2)), (nn.Conv2d(32, 64, kernel_size=3), nn.MaxPool2d(2)))
    ):
        suffix = f"_{index}" if index else ""
        relu = (f"relu{suffix}", nn.ReLU())
        pooling = (f"max_pooling2d{suffix}", pool)
        blocks += [(f"conv2d{suffix}", conv), *((pooling, relu) if pool_before_relu else (relu, pooling))]
    network = nn.Sequential(
        OrderedDict(
            [
                *blocks,
                ("conv2d_2", nn.Conv2d(64, 64, kernel_size=3)),
                ("relu_2", nn.ReLU()),
                ("flatten", nn.Flatten()),
                ("dense", nn.Linear(3 * 3 * 64, 64)),
                ("relu_3", nn.ReLU()),
                ("dense_1", nn.Linear(64, num_classes)),
            ]
        )
    )
    network.apply(init_like_keras)
    return network


def init_like_keras(module: nn.Module) -> None:
    """Keras's default initialisation (Glorot-uniform kernels, zero biases), as the original trained with."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
