"""Training augmentation presets, evaluation transforms, and batch normalisation.

Per-image transforms work on uint8 ``C x H x W`` tensors (PIL images are converted first) and only
move pixels; conversion to float and per-data-set normalisation happen once per batch, in the
loaders' collate function (:class:`NormalizeBatch`). Small images make per-call overhead the
whole cost: torchvision's v2 ``Compose``/``ToDtype``/``Normalize`` spend about 0.5 ms per 32-px
image on bookkeeping, which made a CIFAR epoch from JPEG files four times slower than these
plain callables. The random draws come from the generator a pipeline is called with: the
training split seeds one per image from ``(run seed, epoch, sample index)``
(:func:`~distill.data.splits.sample_seed`), so an image's augmentation does not depend on which
DataLoader worker makes it or on what that worker made before: the same for any ``num_workers``, and
the same after a resume in the middle of an epoch. Without one they draw from torch's global generator.

Evaluation geometry depends on how the data set stores its images:

* ``identity``: stored at the training resolution (MNIST 28 px, CIFAR 32 px, generated data);
* ``resize``: low-resolution images resized (shorter side) and centre-cropped to ``image_size``,
  used when ``image_size`` differs from the native size or images may differ in size;
* ``resize_crop``: photographs, resized to ``round(image_size * 8 / 7)`` then centre-cropped, the
  standard ImageNet protocol (256 -> 224).

Training presets other than ``inception`` add their augmentation on top of that geometry, so every
preset yields ``image_size`` x ``image_size`` images; ``inception`` crops the raw image itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

PRESETS = ("default", "none", "cifar", "jitter", "inception")
GEOMETRIES = ("identity", "resize", "resize_crop")

#: ``step(image, generator)``: a uint8 ``C x H x W`` image, and the generator of its random draws (None: torch's
#: global one)
Step = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def to_uint8_tensor(image: Any) -> torch.Tensor:
    """A PIL image or uint8 tensor as a uint8 ``C x H x W`` tensor (tensors pass through, uncopied)."""
    if isinstance(image, torch.Tensor):
        return image
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # copy: PIL's buffer is read-only


class Pipeline:
    """Steps applied in order to the image as a uint8 tensor."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        tensor = to_uint8_tensor(image)
        for step in self.steps:
            tensor = step(tensor, generator)
        return tensor

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.steps))})"


@dataclass(frozen=True)
class Resize:
    """Resize the shorter side to ``size`` (bilinear, antialiased)."""

    size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return TF.resize(image, [self.size], antialias=True)


@dataclass(frozen=True)
class CenterCrop:
    size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return TF.center_crop(image, [self.size, self.size])


@dataclass(frozen=True)
class PadCrop:
    """Zero-pad by ``padding`` then crop ``size`` x ``size`` at random: a shift of up to ``padding`` px."""

    size: int
    padding: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.padding
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
        return F.pad(image, (p, p, p, p))[:, top:top + self.size, left:left + self.size]


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror left-right with probability 1/2."""

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return image.flip(-1) if torch.rand((), generator=generator).item() < 0.5 else image


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random crop of area ``scale`` (a fraction of the image, uniform) and aspect ratio ``ratio`` (log-uniform),
    resized to ``size`` x ``size``: the Inception crop as torchvision's ``RandomResizedCrop`` samples it (10
    attempts, then the largest central crop whose ratio lies in ``ratio``), drawing from ``generator``."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """``(top, left, crop height, crop width)``."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            draws = torch.rand(2, generator=generator)
            target = area * (self.scale[0] + draws[0].item() * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0].item() + draws[1].item() * (log_ratio[1] - log_ratio[0]).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, h, w = self.box(image.shape[-2], image.shape[-1], generator)
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)


@dataclass(frozen=True)
class Geometry:
    """How raw images become ``size`` x ``size``: one of :data:`GEOMETRIES`."""

    size: int
    mode: str

    def steps(self) -> list[Step]:
        if self.mode == "identity":
            return []
        resize_to = self.size if self.mode == "resize" else round(self.size * 8 / 7)
        return [Resize(resize_to), CenterCrop(self.size)]


def eval_transform(geometry: Geometry) -> Pipeline:
    """Deterministic evaluation transform: the geometry only."""
    return Pipeline(geometry.steps())


def train_transform(preset: str, geometry: Geometry) -> Pipeline:
    """Training transform for a resolved preset (not ``default``).

    * ``none``: the evaluation transform.
    * ``cifar``: zero padding then a random crop back to size, and a horizontal flip: the
      standard CIFAR recipe. The padding is ``size / 8`` (4 px at 32 px) so it scales with size.
    * ``jitter``: random translation by up to 2 px in each direction, zero filled, no flip
      (digits are not mirror-symmetric): the augmentation of Hinton et al.'s MNIST teacher.
    * ``inception``: random resized crop (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip.
    """
    size = geometry.size
    if preset == "none":
        steps = geometry.steps()
    elif preset == "cifar":
        steps = [*geometry.steps(), PadCrop(size, max(1, round(size / 8))), HorizontalFlip()]
    elif preset == "jitter":
        steps = [*geometry.steps(), PadCrop(size, 2)]
    elif preset == "inception":
        steps = [RandomResizedCrop(size), HorizontalFlip()]
    else:  # the data module validates names first
        raise ValueError(f"not a resolved augmentation preset: {preset!r}")
    return Pipeline(steps)


class NormalizeBatch:
    """Collate ``(uint8 image, label, index)`` items into ``(float images, int64 labels, int64 indices)``.

    Images become float32 ``(x / 255 - mean) / std`` per channel, computed once for the batch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self._scale = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1) * 255

    def __call__(self, items: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, ...]:
        images, labels, indices = zip(*items)
        batch = torch.stack(images).to(torch.float32).sub_(self._shift).div_(self._scale)
        return batch, torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"NormalizeBatch(mean={self.mean}, std={self.std})"
