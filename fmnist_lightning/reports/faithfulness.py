"""Whether attribution maps are faithful to the model: the deletion curve (the predicted class's probability
while the most attributed pixels are blacked out first, against a random order) and the model-randomisation
sanity check (Adebayo et al. 2018: a re-initialised network's maps must not look like the trained one's)."""

from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchmetrics.functional import spearman_corrcoef

from fmnist_lightning.data.batches import INFERENCE_BATCH, in_batches
from fmnist_lightning.data.decode import SIDE
from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.attributions import Method, attribution_maps, checked_layer

DELETION_STEPS = 28  # 28 pixels more at each step: all 784 are black at the end
# The randomisation check passes when the maps of the trained and the re-initialised network share less rank
# order than this (mean Spearman correlation per image); a map that ignores the weights would reach ~1.
RANDOMISATION_THRESHOLD = 0.5


@torch.no_grad()
def deletion_curves(
    model: FashionMNISTClassifier,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    generator: torch.Generator,
    steps: int = DELETION_STEPS,
) -> torch.Tensor:
    """N x (steps + 1): the probability of `classes[i]` as image i's pixels are set to black (0, the background)
    in order of decreasing `maps[i]`, an equal share at each step; column 0 is the intact image, the last one
    all black. Ties are taken in a random order, so a flat map (all zeros) gives the random-order curve."""
    count, pixels = len(images), SIDE * SIDE
    inputs = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    shuffled = torch.stack([torch.randperm(pixels, generator=generator) for _ in range(count)])
    order = shuffled.gather(1, maps.flatten(1).gather(1, shuffled).argsort(dim=1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels).expand(count, -1).contiguous())
    deleted = torch.linspace(0, pixels, steps + 1).round().long()  # pixels black at each point of the curve

    def curves(index: torch.Tensor) -> torch.Tensor:
        kept = rank[index, None, :] >= deleted[None, :, None]  # images x points x pixels
        batch = (inputs[index].flatten(1)[:, None, :] * kept).view(-1, 1, SIDE, SIDE)
        probabilities = model.probabilities(batch).view(len(index), steps + 1, -1)
        return probabilities[torch.arange(len(index)), :, classes[index]]

    return in_batches(curves, torch.arange(count), batch_size=max(1, INFERENCE_BATCH // (steps + 1)))


def area_under(curves: torch.Tensor) -> torch.Tensor:
    """Per curve, the area under it over the fraction of pixels deleted (0 to 1): lower, the faster it fell."""
    return torch.trapezoid(curves, dx=1 / (curves.shape[1] - 1), dim=1)


def randomized_copy(model: FashionMNISTClassifier, seed: int) -> FashionMNISTClassifier:
    """A deep copy whose network has every weight re-initialised (each layer's own `reset_parameters`)."""
    copy = deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in copy.network.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return copy.eval()


def rank_correlation(maps: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per image, the Spearman rank correlation of two maps' pixels (0 where a map is flat)."""
    return spearman_corrcoef(maps.flatten(1).T.contiguous(), other.flatten(1).T.contiguous()).reshape(len(maps))


@dataclass
class Faithfulness:
    """What the two checks measured over `images` test images (mean curves for the picture)."""

    method: str
    layer: str | None
    images: int
    deletion_auc: float  # mean over the images; lower: the attribution found what the prediction rests on
    random_auc: float
    attribution_curve: list[float]
    random_curve: list[float]
    randomisation_spearman: float  # of the maps as they are: the check
    # of their absolute values: how much of the maps' magnitude follows the picture rather than the weights
    randomisation_spearman_abs: float
    randomisation_threshold: float = RANDOMISATION_THRESHOLD

    @property
    def auc_difference(self) -> float:
        return self.random_auc - self.deletion_auc

    @property
    def auc_ratio(self) -> float:
        return self.deletion_auc / self.random_auc

    @property
    def randomisation_passed(self) -> bool:
        return self.randomisation_spearman < self.randomisation_threshold

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "auc_difference": self.auc_difference,
            "auc_ratio": self.auc_ratio,
            "randomisation_passed": self.randomisation_passed,
            "deletion_steps": len(self.attribution_curve) - 1,
        }


def measure_faithfulness(
    model: FashionMNISTClassifier,
    images: torch.Tensor,
    classes: torch.Tensor,
    method: Method,
    layer: str | None = None,
    seed: int = 0,
) -> Faithfulness:
    """Both checks for the maps of `method` explaining `classes` (the model's predictions) on `images`."""
    layer = checked_layer(model, layer) if method == "gradcam" else None
    maps = attribution_maps(model, images, method, classes, layer)
    generator = torch.Generator().manual_seed(seed)
    attributed = deletion_curves(model, images, maps, classes, generator)
    random = deletion_curves(model, images, torch.zeros_like(maps), classes, generator)
    random_maps = attribution_maps(randomized_copy(model, seed), images, method, classes, layer)
    return Faithfulness(
        method=method,
        layer=layer,
        images=len(images),
        deletion_auc=float(area_under(attributed).mean()),
        random_auc=float(area_under(random).mean()),
        attribution_curve=attributed.mean(dim=0).tolist(),
        random_curve=random.mean(dim=0).tolist(),
        randomisation_spearman=float(rank_correlation(maps, random_maps).mean()),
        randomisation_spearman_abs=float(rank_correlation(maps.abs(), random_maps.abs()).mean()),
    )
