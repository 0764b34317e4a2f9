"""The plain nn.Modules: input scaling, the original Keras network, a pre-activation ResNet and MobileNetV2,
and `build_network`, the one place that maps `model.architecture` to a network (a new architecture goes here,
with its settings in the settings table, not into the LightningModule).

Layer names follow the Keras summary (conv2d, max_pooling2d, conv2d_1, ...) so Lightning's reads like the original's.
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

# Mean and standard deviation of the 60,000 official training images, pixels in [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class InputScaling(nn.Module):
    """uint8 pixels (or floats in [0, 1]) to network input.

    It lives in the model so that checkpoints and exported models carry their own preprocessing.
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


def original_cnn(
    num_classes: int = 10,
    pool_before_relu: bool = False,
    batch_norm: bool = False,
    dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
) -> nn.Sequential:
    """The Keras original (93,322 parameters) returning logits: its softmax is folded into the loss.

    `pool_before_relu` computes the same function with less work (max and ReLU commute); same checkpoints.
    """
    if len(dropout) != 4 or not all(0 <= rate < 1 for rate in dropout):
        raise ValueError(f"dropout takes 4 rates in [0, 1), one per position, got {list(dropout)}")
    layers: list[tuple[str, nn.Module]] = []
    for index, (channels_in, channels_out) in enumerate(((1, 32), (32, 64), (64, 64))):
        suffix = f"_{index}" if index else ""
        layers.append((f"conv2d{suffix}", nn.Conv2d(channels_in, channels_out, kernel_size=3)))
        if batch_norm:
            layers.append((f"batch_normalization{suffix}", nn.BatchNorm2d(channels_out)))
        relu = (f"relu{suffix}", nn.ReLU())
        if index < 2:
            pooling = (f"max_pooling2d{suffix}", nn.MaxPool2d(2))
            layers += [pooling, relu] if pool_before_relu else [relu, pooling]
        else:
            layers.append(relu)
        if dropout[index]:
            layers.append((f"dropout{suffix}", nn.Dropout(dropout[index])))
    layers += [("flatten", nn.Flatten()), ("dense", nn.Linear(3 * 3 * 64, 64)), ("relu_3", nn.ReLU())]
    if dropout[3]:
        layers.append(("dropout_3", nn.Dropout(dropout[3])))
    layers.append(("dense_1", nn.Linear(64, num_classes)))
    network = nn.Sequential(OrderedDict(layers))
    network.apply(init_like_keras)
    return network


def init_like_keras(module: nn.Module) -> None:
    """Keras's default initialisation (Glorot-uniform kernels, zero biases), as the original trained with."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class MobileNetV2Classifier(nn.Module):
    """torchvision's MobileNetV2 for 28x28 grayscale pictures: resized to 64x64, the channel repeated to three.

    `pretrained` loads the ImageNet weights and standardises inputs as they expect; the last layer is always new.
    """

    SIZE = 64
    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, num_classes: int = 10, pretrained: bool | str = False) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.backbone = mobilenet_v2(weights=None)
        if pretrained:
            weights = local_weights(pretrained) if isinstance(pretrained, str) else imagenet_weights()
            try:
                self.backbone.load_state_dict(weights)
            except RuntimeError as error:  # a strict load names what does not fit
                raise ValueError(
                    f"{pretrained} does not hold MobileNetV2 weights ({str(error).splitlines()[0]})"
                ) from None
        self.backbone.classifier[-1] = nn.Linear(self.backbone.last_channel, num_classes)
        mean, std = (self.IMAGENET_MEAN, self.IMAGENET_STD) if pretrained else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = nn.functional.interpolate(images, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        return self.backbone((resized.expand(-1, 3, -1, -1) - self.mean) / self.std)


def local_weights(path: str) -> dict[str, torch.Tensor]:
    """ImageNet weights copied onto a machine without internet: a state dict saved with `torch.save`, read
    without running pickled code."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"pretrained weights file {path} does not exist; give a MobileNetV2 state dict file") from None
    except Exception as error:  # unpickling refused, truncated or not a torch file: all mean the same here
        raise ValueError(f"{path} is not a readable weights file ({str(error).splitlines()[0]})") from None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} is not a state dict of MobileNetV2 weights")
    return weights


def imagenet_weights(timeout_seconds: float = 20.0) -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 ImageNet weights, from its cache or the internet; a clear error offline."""
    import socket

    from torchvision.models import MobileNet_V2_Weights

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_seconds)  # a blocked network fails in seconds instead of hanging
    try:
        return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad download a RuntimeError
        raise ValueError(
            f"pretrained MobileNetV2 weights are not available ({error}); run once with internet access so "
            "torchvision can cache them, or set model.pretrained: false"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


class PreActBlock(nn.Module):
    """Two 3x3 convolutions, each after BatchNorm and ReLU, added to the input (a 1x1 projection when the
    shape changes): the pre-activation residual block."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(channels_in), nn.BatchNorm2d(channels_out)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        changes = stride != 1 or channels_in != channels_out
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False) if changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(nn.functional.relu(self.bn2(out))) + shortcut


def preact_resnet(num_classes: int = 10, depth: int = 20, width: int = 16) -> nn.Sequential:
    """A pre-activation ResNet for 28x28 grayscale: three stages of (depth - 2) / 6 blocks at `width`,
    2x and 4x channels (28, 14, 7 pixels), then global average pooling. Depth 20, width 16: ResNet-20."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
    if width < 1:
        raise ValueError(f"resnet width must be at least 1, got {width}")
    blocks = (depth - 2) // 6
    layers: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(1, width, 3, padding=1, bias=False))]
    channels = width
    for stage, factor in enumerate((1, 2, 4)):
        for block in range(blocks):
            stride = 2 if stage and not block else 1
            layers.append((f"stage{stage + 1}_block{block + 1}", PreActBlock(channels, width * factor, stride)))
            channels = width * factor
    layers += [
        ("bn", nn.BatchNorm2d(channels)),
        ("relu", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("dense", nn.Linear(channels, num_classes)),
    ]
    network = nn.Sequential(OrderedDict(layers))
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network


def build_network(
    architecture: str,
    num_classes: int,
    pool_before_relu: bool = True,
    batch_norm: bool = False,
    dropout: float | Sequence[float] = 0.0,
    depth: int = 20,
    width: int = 16,
    pretrained: bool | str = False,
) -> nn.Module:
    """The network `model.architecture` names, from the settings that architecture takes; ValueError for bad ones."""
    if architecture == "mobilenet_v2":
        return MobileNetV2Classifier(num_classes, pretrained)
    if architecture == "resnet":
        return preact_resnet(num_classes, depth, width)
    if architecture == "original":
        rates = [dropout] * 4 if isinstance(dropout, int | float) else list(dropout)
        return original_cnn(num_classes, pool_before_relu, batch_norm, rates)
    raise ValueError(f"unknown architecture {architecture!r}; choose original, resnet or mobilenet_v2")
