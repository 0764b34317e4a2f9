"""Data augmentation on whole batches, on the batch's own device: no per-image Python work.

Randomness comes from the device's global generator, seeded by `seed_everything` and saved by `RandomState`.
"""

import math

import torch
from torch import nn


class BatchAugment(nn.Module):
    """Random rotation and zoom, translation (zero padding + crop), horizontal flip and random erasing for
    N x 1 x H x W batches.

    Args:
        translate: Largest shift in pixels, in each direction (0: off).
        flip: Mirror each image left-right with probability 1/2.
        erase: Probability of blanking one rectangle of 2-20% of the image (0: off).
        rotate: Largest rotation in degrees, either way (0: off).
        zoom: Largest relative change of scale, either way: 0.1 scales by 0.9 to 1.1 (0: off).
    """

    def __init__(
        self, translate: int = 0, flip: bool = False, erase: float = 0.0, rotate: float = 0.0, zoom: float = 0.0
    ) -> None:
        super().__init__()
        if translate < 0 or not 0 <= erase <= 1:
            raise ValueError(f"translate must be >= 0 and erase in [0, 1], got {translate} and {erase}")
        if not 0 <= rotate <= 180 or not 0 <= zoom < 1:
            raise ValueError(f"rotate must be in [0, 180] degrees and zoom in [0, 1), got {rotate} and {zoom}")
        self.translate = translate
        self.flip = flip
        self.erase = erase
        self.rotate = rotate
        self.zoom = zoom

    @property
    def active(self) -> bool:
        return bool(self.translate or self.flip or self.erase or self.rotate or self.zoom)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.rotate or self.zoom:
            count, device = len(images), images.device
            angles = (torch.rand(count, device=device) * 2 - 1) * math.radians(self.rotate)
            scales = 1 + (torch.rand(count, device=device) * 2 - 1) * self.zoom
            images = rotate_and_scale(images, angles, scales)
        if self.translate:
            images = self._shift(images)
        if self.flip:
            mirrored = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        if self.erase:
            images = images.masked_fill(self._erase_mask(images), 0)
        return images

    def _shift(self, images: torch.Tensor) -> torch.Tensor:
        count, _, height, width = images.shape
        pad = self.translate
        padded = nn.functional.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, count), device=images.device)
        rows = offsets[0][:, None] + torch.arange(height, device=images.device)  # N x H
        cols = offsets[1][:, None] + torch.arange(width, device=images.device)  # N x W
        batch = torch.arange(count, device=images.device)[:, None, None]
        return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)

    def _erase_mask(self, images: torch.Tensor) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        area = torch.empty(count, device=device).uniform_(0.02, 0.2) * height * width
        log_ratio = torch.empty(count, device=device).uniform_(-1.2, 1.2)  # aspect ratio 0.3 to 3.3
        erase_h = (area * log_ratio.exp()).sqrt().round().clamp(1, height).long()
        erase_w = (area / log_ratio.exp()).sqrt().round().clamp(1, width).long()
        top = (torch.rand(count, device=device) * (height - erase_h + 1)).long()
        left = (torch.rand(count, device=device) * (width - erase_w + 1)).long()
        chosen = torch.rand(count, device=device) < self.erase
        rows = torch.arange(height, device=device)[None, :]
        cols = torch.arange(width, device=device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + erase_h)[:, None])  # N x H
        in_cols = (cols >= left[:, None]) & (cols < (left + erase_w)[:, None])  # N x W
        return (chosen[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def rotate_and_scale(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each image turned by its angle (radians) and scaled by its factor about the centre, bilinear, black
    outside; dtype kept (uint8 batches stay uint8)."""
    cos, sin = angles.cos() / scales, angles.sin() / scales  # the grid maps output pixels back to input ones
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    warped = nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else warped
