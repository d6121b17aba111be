"""Batched, on-device augmentation: inception crops, flips and mixup for a whole batch at once.

Beyer et al. (2022) augment every training image with an inception crop and a flip and then mix the
batch; doing that per sample in PIL/torchvision transforms would starve a GPU at the batch sizes and
epoch counts of the paper. Here the random draws are a few numbers per image (made on the CPU with an
explicit ``torch.Generator``, so they are identical on every device type), and the pixels are moved in
one call for the whole batch (``torch.nn.functional.grid_sample`` with per-sample affine grids), on
whatever device the batch is on.

All functions are pure: the randomness comes only from the ``generator`` argument. A caller that
seeds the generator from ``(global seed, epoch, batch, rank)`` (see
:func:`batch_generator`) gets the same crops after a resume, and different crops on different DDP
ranks.

Official code: big_vision ``pp/ops_image.py`` (``inception_crop``: TF's ``sample_distorted_bounding_box``
with area 0.08–1, aspect 3/4–4/3, whole image as fallback; ``flip_lr``) and ``utils.py`` (``mixup``:
one ``a ~ Beta(p, p)`` per batch, ``a = max(a, 1 − a)``, partner = the batch rolled by one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

INCEPTION_SCALE = (0.08, 1.0)
INCEPTION_RATIO = (3 / 4, 4 / 3)


def batch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers such as ``(seed, epoch, batch_idx, rank)``.

    ``numpy.random.SeedSequence`` mixes the keys, so neighbouring steps or ranks get unrelated streams.
    """
    keys = [int(k) % 2**63 for k in keys]
    # SeedSequence turns a list of ints into 32-bit words in Python (~15 µs of a training step); keys
    # below 2**32 are one word each, so an array of them is the same entropy, taken as it is.
    entropy = np.array(keys, dtype=np.uint32) if max(keys, default=0) < 2**32 else keys
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_inception_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: Sequence[float] = INCEPTION_SCALE,
    ratio: Sequence[float] = INCEPTION_RATIO,
    attempts: int = 10,
) -> Tensor:
    """Per-sample random crop boxes ``[batch, 4]`` as ``(x1, y1, x2, y2)`` in pixels (float, CPU).

    The inception crop: area uniform in ``scale`` × image area, aspect ratio log-uniform in ``ratio``;
    the first of ``attempts`` candidates that fits the image is taken, otherwise the whole image (TF's
    and torchvision's fallback), then the position is uniform. Boxes are continuous (sub-pixel), which
    :func:`crop_resize` samples bilinearly.
    """
    area = height * width
    areas = area * torch.empty(batch, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    widths, heights = (areas * aspect).sqrt(), (areas / aspect).sqrt()
    fits = (widths <= width) & (heights <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first candidate that fits (0 if none)
    found = fits.any(dim=1)
    rows = torch.arange(batch)
    w = torch.where(found, widths[rows, first], torch.full((batch,), float(width)))
    h = torch.where(found, heights[rows, first], torch.full((batch,), float(height)))
    x1 = torch.rand(batch, generator=generator) * (width - w)
    y1 = torch.rand(batch, generator=generator) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def central_boxes(batch: int, height: int, width: int, fraction: float = 1.0) -> Tensor:
    """Boxes of the central ``fraction`` of each side (1.0 = the whole image), ``[batch, 4]``."""
    w, h = width * fraction, height * fraction
    box = torch.tensor([(width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2])
    return box.expand(batch, 4).clone()


def crop_resize(images: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None) -> Tensor:
    """Crop every image to its box, resize it to ``size`` × ``size`` and mirror it where ``flips``.

    One ``grid_sample`` call for the whole batch: each image gets an affine sampling grid spanning its
    box (mirrored left-right where ``flips`` is true, so flipping costs nothing). Bilinear sampling at
    half-pixel centres without anti-aliasing, which is what the official code's ``inception_crop``
    does (TF's ``tf.image.resize`` bilinear, ``antialias=False``); a box of the whole image at the
    image's own size returns the image (up to float rounding). One difference from slicing first: the outermost
    output pixels of a box inside the image interpolate towards the pixels just outside the box
    instead of clamping at its edge. Integer images are converted to float32.
    """
    if not images.is_floating_point():
        images = images.float()
    batch, channels, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    theta = images.new_zeros(batch, 2, 3)
    # normalised coordinates [-1, 1] span the image's outer pixel edges (align_corners=False)
    theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) / width
    theta[:, 0, 2] = (boxes[:, 0] + boxes[:, 2]) / width - 1
    theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / height
    theta[:, 1, 2] = (boxes[:, 1] + boxes[:, 3]) / height - 1
    if flips is not None:
        theta[:, 0, 0] *= 1 - 2 * flips.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_flips(batch: int, generator: torch.Generator) -> Tensor:
    """A boolean mask ``[batch]``: which images to mirror (probability 1/2 each)."""
    return torch.rand(batch, generator=generator) < 0.5


def flip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images where ``mask`` is true."""
    mask = mask.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


def sample_mixup(generator: torch.Generator, alpha: float = 1.0) -> float:
    """The batch's mixup coefficient: ``a ~ Beta(α, α)``, ``a = max(a, 1 − a)``, so ``a ∈ [0.5, 1]``.

    Beta(1, 1), the official setting, is the uniform distribution; other α draw from NumPy's Beta with
    a seed taken from ``generator`` (torch's Beta sampler takes no generator).
    """
    if alpha == 1.0:
        a = float(torch.rand((), generator=generator))
    else:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        a = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(a, 1.0 - a)


def mix(images: Tensor, a: float) -> Tensor:
    """``a · x + (1 − a) · roll(x, 1)``: each image mixed with its neighbour in the batch."""
    return a * images + (1.0 - a) * images.roll(1, dims=0)


def mixup(images: Tensor, generator: torch.Generator, alpha: float = 1.0) -> tuple[Tensor, float]:
    """Mixup as in big_vision: one coefficient per batch (see :func:`sample_mixup`), partner = roll by one.

    Returns ``(mixed images, a)``. To feed a second view (the teacher's, at another resolution) the
    identical mixture, apply :func:`mix` to it with the same ``a``.
    """
    a = sample_mixup(generator, alpha)
    return mix(images, a), a


__all__ = [
    "INCEPTION_SCALE", "INCEPTION_RATIO", "batch_generator", "sample_inception_boxes", "central_boxes",
    "crop_resize", "sample_flips", "flip", "sample_mixup", "mix", "mixup",
]
