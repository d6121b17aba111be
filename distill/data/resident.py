"""Device-resident data: a whole split as one uint8 tensor on the training device, augmented a batch at a time.

For data sets that fit in memory (mnist5k, CIFAR-10/100, small image folders) the per-image
DataLoader path spends its time on Python per sample (indexing, transform calls, collation) and, with
workers, on inter-process copies. Here the split is decoded once into ``N x C x H x W`` uint8
(about 150 MB for CIFAR's 50,000 images), moved to the device once, and every batch is one gather,
one batched crop/flip and one normalisation on the device, in the training process (no workers).

Same samples, same order: the order of a training epoch is :class:`~distill.data.splits.EpochShuffle`'s
for the same ``(seed, epoch)`` (under DDP, the same per-process shares of it), batches are ``(images, labels, indices)`` as on the DataLoader path, and
without augmentation the images are bit-identical. The random crop and flip draw from a generator
seeded by ``(seed, epoch)``, so a run, and a resumed run, is reproducible; the draws differ from the
per-image path's (which uses the global generator in each worker), so augmented pixels are not
the same as there, only identically distributed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from distill.data.splits import EpochShuffle, IndexedSplit
from distill.errors import ConfigError

#: Presets with a batched implementation here; ``inception`` crops raw images of any size and is not.
RESIDENT_PRESETS = ("none", "cifar", "jitter")
# Offsets the augmentation stream from the shuffling stream of the same seed.
AUGMENT_STREAM = 7919


def materialise(split: IndexedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images after its (deterministic) transform as one uint8 tensor, and its labels.

    In-memory sources (mnist5k, fake) are one gather; others (CIFAR from torchvision, JPEG folders)
    are decoded once, image by image.
    """
    base = split.data.base
    stored = getattr(base, "images", None)
    labels = torch.as_tensor(split.labels, dtype=torch.int64)
    if isinstance(stored, torch.Tensor) and not split.transform.steps:
        return stored[torch.as_tensor(split.source_indices, dtype=torch.int64)].contiguous(), labels
    images = [split[position][0] for position in range(len(split))]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise ConfigError(f"device_resident needs images of one size, got {sorted(shapes)[:3]}...; set image_size.")
    return torch.stack(images), labels


class BatchAugment:
    """The ``none`` / ``cifar`` / ``jitter`` presets of :mod:`distill.data.transforms` on a uint8 batch.

    ``cifar``: zero-pad by ``size / 8`` (4 px at 32 px), crop back at a random offset per image, and
    mirror with probability 1/2; ``jitter``: pad 2, crop, no flip. As the per-image transforms.

    Each preset has a finite set of views of an image, :attr:`views` of them (``cifar`` at 32 px: 9 × 9 crop
    offsets × 2 = 162), numbered ``(top · positions + left) · flips + mirrored``. :meth:`draw` picks one per
    image and :meth:`apply` cuts it, so the teacher's output for every view of every image can be computed once
    and looked up by ``(index, view)`` (BaselineKD's ``cache_teacher_outputs`` on augmented resident data).
    """

    def __init__(self, preset: str, size: int) -> None:
        if preset not in RESIDENT_PRESETS:
            raise ConfigError(f"device_resident supports augment {', '.join(RESIDENT_PRESETS)}, not {preset!r}; "
                              "use the DataLoader path (device_resident: false) for it.")
        self.preset = preset
        self.padding = {"none": 0, "cifar": max(1, round(size / 8)), "jitter": 2}[preset]
        self.flip = preset == "cifar"
        self.positions = 2 * self.padding + 1  # crop offsets per axis
        self.flips = 2 if self.flip else 1

    @property
    def views(self) -> int:
        """How many different images the preset can make of one image."""
        return self.positions ** 2 * self.flips

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A random view per image (int64, on the generator's device)."""
        device = generator.device
        views = torch.zeros(batch, dtype=torch.int64, device=device)
        if self.padding:
            top, left = torch.randint(0, self.positions, (2, batch), device=device, generator=generator)
            views = (top * self.positions + left) * self.flips
        if self.flip:
            views = views + (torch.rand(batch, device=device, generator=generator) < 0.5)
        return views

    def apply(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Each image in its view (``views``: one number per image, as :meth:`draw` gives)."""
        place = views // self.flips
        if self.padding:
            images = crop_at(images, self.padding, place // self.positions, place % self.positions)
        if self.flip:
            mirror = (views % self.flips).bool()
            images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)
        return images

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))


def crop_at(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad every image by ``padding`` and cut it back to its size at offset ``(top[i], left[i])`` of the
    padded image (one gather for the whole batch)."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = (top.view(batch, 1) + torch.arange(height, device=images.device)).view(batch, 1, height, 1)
    cols = (left.view(batch, 1) + torch.arange(width, device=images.device)).view(batch, 1, 1, width)
    sample = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[sample, channel, rows, cols]


class DeviceResidentLoader:
    """An iterable of ``(float images, labels, indices)`` batches cut from tensors on one device.

    Args:
        images, labels: the whole split (uint8 ``N x C x H x W``, int64 ``N``), moved to ``device`` here.
        batch_size: as the DataLoader's; the last batch may be smaller (no ``drop_last``).
        mean, std: normalisation, as :class:`~distill.data.transforms.NormalizeBatch`.
        shuffle: training order (EpochShuffle of ``seed``) and augmentation; else in order, unaugmented.
        preset: augmentation preset (``none``, ``cifar``, ``jitter``); used only when shuffling.
        seed: the run's seed (``torch.initial_seed()`` as for the DataLoader path).
        num_replicas, rank: DDP processes; each reads its EpochShuffle share, as on the DataLoader path.
        with_views: training batches are ``(images, labels, indices, views)``: the view number of each image
            (:class:`BatchAugment`), for a teacher cache of every view.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool, preset: str = "none", seed: int = 0,
                 device: torch.device | str = "cpu", num_replicas: int = 1, rank: int = 0,
                 with_views: bool = False) -> None:
        device = torch.device(device)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = device
        self.augment = BatchAugment(preset if shuffle else "none", images.shape[-1])
        self.with_views = with_views and shuffle
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.scale = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        #: Lightning calls ``sampler.set_epoch`` on anything with a ``sampler`` attribute (and reads
        #: ``batch_sampler`` next to it).
        self.sampler = None
        self.batch_sampler = None
        if shuffle:
            positions = range(len(self.labels))
            self.sampler = EpochShuffle(positions, seed, num_replicas, rank)  # the DataLoader path's shards

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.labels)
        return -(-count // self.batch_size)

    def _order(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(len(self.labels))
        return torch.as_tensor(list(self.sampler), dtype=torch.int64)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32).sub_(self.shift).div_(self.scale)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self._order().to(self.device)
        generator = None
        if self.shuffle and self.augment.preset != "none":
            epoch = getattr(self.sampler, "epoch", 0)
            generator = torch.Generator(device=self.device)
            generator.manual_seed((self.seed * 1_000_003 + epoch * AUGMENT_STREAM + 1) % 2**62)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            views = None
            if generator is not None:
                views = self.augment.draw(len(index), generator)
                images = self.augment.apply(images, views)
            batch = (self._normalise(images), self.labels[index], index)
            if self.with_views:
                yield (*batch, views if views is not None else torch.zeros_like(index))
            else:
                yield batch

    def in_view(self, augment: BatchAugment, view: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The whole split in order, every image in view number ``view`` of ``augment``: ``(images, labels,
        indices)`` batches, pixel for pixel what a training batch holds for an image drawn in that view."""
        for start in range(0, len(self.labels), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(self.labels)), device=self.device)
            views = torch.full_like(index, view)
            yield self._normalise(augment.apply(self.images[index], views)), self.labels[index], index


__all__ = ["DeviceResidentLoader", "BatchAugment", "materialise", "crop_at", "RESIDENT_PRESETS"]
