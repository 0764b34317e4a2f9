"""Attribution maps from Captum: for a batch of images, one 28x28 map per image saying how much each pixel counts
towards a class (Grad-CAM on a feature-map layer, Integrated Gradients, Occlusion); which layers Grad-CAM can
read, and the one it reads by default."""

from typing import Literal, get_args

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
from torch import nn

from fmnist_lightning.data.batches import in_batches
from fmnist_lightning.data.decode import SIDE
from fmnist_lightning.errors import UserError
from fmnist_lightning.module import FashionMNISTClassifier

Method = Literal["gradcam", "ig", "occlusion"]
METHODS: tuple[str, ...] = get_args(Method)
IG_STEPS = 32  # points on the path from the black image; more change the maps little on 28x28 pictures
IG_BATCH = 1024  # path points per forward pass inside Integrated Gradients
OCCLUSION_WINDOW, OCCLUSION_STRIDE = 4, 2  # 169 positions of a 4x4 black square
OCCLUSION_BATCH = 1024  # occluded images per forward pass
# A feature map at least this wide still says where on the 28x28 picture the evidence is (a cell ~3 pixels);
# the original's conv2d_2 (3x3) and the ResNet's last stage (7x7) only say which third of it.
READABLE_SIDE = 10


def feature_map_sides(network: nn.Module) -> dict[str, int]:
    """Each named submodule of `network` whose output is a 4-D feature map -> the map's height, in the order
    the forward pass finishes them (found with forward hooks on one black picture)."""
    sides: dict[str, int] = {}

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sides.setdefault(name, output.shape[-2])

        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in network.named_modules() if name]
    device = next(network.parameters()).device
    try:
        with torch.no_grad():
            network(torch.zeros(1, 1, SIDE, SIDE, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return sides


def default_layer(model: FashionMNISTClassifier) -> str:
    """The last layer holding a convolution whose feature map is still readable (READABLE_SIDE): conv2d_1
    (11x11) in the original network, the last block of the ResNet's 14x14 stage."""
    modules = dict(model.network.named_modules())
    readable = [
        name
        for name, side in feature_map_sides(model.network).items()
        if side >= READABLE_SIDE and any(isinstance(module, nn.Conv2d) for module in modules[name].modules())
    ]
    return readable[-1]


def checked_layer(model: FashionMNISTClassifier, name: str | None) -> str:
    """`name` if Grad-CAM can read it (a layer of the network with a 4-D feature map), the default for None;
    otherwise a UserError listing the layers it can read."""
    if name is None:
        return default_layer(model)
    layers = list(feature_map_sides(model.network))
    if name not in layers:
        raise UserError(
            f"--layer {name!r} is not a feature-map layer of this {model.hparams.architecture} network; "
            f"choose one of: {', '.join(layers)}"
        )
    return name


def attribution_maps(
    model: FashionMNISTClassifier, images: torch.Tensor, method: Method, targets: torch.Tensor, layer: str | None = None
) -> torch.Tensor:
    """N x 28 x 28 float32 maps for N x 1 x 28 x 28 images (uint8, or float in [0, 1]): how much each pixel
    counts towards class `targets[i]`, larger is more. Grad-CAM reads `layer` (default: `default_layer`);
    computed in float32, in eval mode, without autocast, `INFERENCE_BATCH` images at a time."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    model.eval()
    inputs = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    layer_module = dict(model.network.named_modules())[checked_layer(model, layer)] if method == "gradcam" else None

    def batch_maps(index: torch.Tensor) -> torch.Tensor:
        batch, target = inputs[index], targets[index]
        if method == "gradcam":
            cam = LayerGradCam(model, layer_module).attribute(batch, target=target, relu_attributions=True)
            return LayerAttribution.interpolate(cam, (SIDE, SIDE), "bilinear").detach()
        if method == "ig":
            ig = IntegratedGradients(model)
            return ig.attribute(batch, 0.0, target, n_steps=IG_STEPS, internal_batch_size=IG_BATCH).detach()
        with torch.no_grad():
            return Occlusion(model).attribute(
                batch,
                sliding_window_shapes=(1, OCCLUSION_WINDOW, OCCLUSION_WINDOW),
                strides=(1, OCCLUSION_STRIDE, OCCLUSION_STRIDE),
                baselines=0.0,
                target=target,
                perturbations_per_eval=max(1, OCCLUSION_BATCH // len(batch)),
            )

    with torch.autocast(inputs.device.type, enabled=False):
        return in_batches(batch_maps, torch.arange(len(inputs)))[:, 0].float()
