"""What every data set source provides to :class:`~distill.data.DistillDataModule`.

A source knows its fixed facts (classes, channels, native size, normalisation, default
augmentation), checks cheaply that its files exist, downloads them if it can, and loads its
splits as :class:`~distill.data.splits.SplitData`: always ``train`` and ``test``, and ``val`` when
the data set has its own validation split (otherwise the data module carves one out of ``train``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from distill.data.splits import SplitData
from distill.data.transforms import Geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fixed seed of test splits that a source carves itself (mnist5k, sun397): the test set must not
# move when a user changes ``split_seed``, or test accuracies of different runs would not compare.
FIXED_TEST_SEED = 20240517


@dataclass
class SourceConfig:
    """The data module's settings a source may need."""

    root: Path
    image_size: int | None = None
    num_classes: int = 10  # fake only
    in_channels: int = 3  # fake only
    fake_sizes: list[int] = field(default_factory=lambda: [256, 64, 64])
    check_images: str = "header"  # folder data sets: see distill.data.folders.CHECK_MODES
    bad_images: str = "error"  # folder data sets: see distill.data.folders.BAD_IMAGE_ACTIONS


class Source:
    """Base class of data set sources; subclasses override the class attributes that differ."""

    name: ClassVar[str]
    in_channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    native_size: int = 224  # the default image_size
    geometry_mode: str = "resize_crop"  # evaluation geometry, see distill.data.transforms
    default_preset: str = "inception"
    default_val_fraction: float | None = 0.1  # None: the data set has its own validation split

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.root = config.root

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def check(self) -> None:
        """Raise DataNotFoundError unless the files are in place; must be cheap (no loading)."""

    def download(self) -> None:
        """Fetch missing files (only where ``download: true``); DataNotFoundError on failure."""

    def load(self) -> dict[str, SplitData]:
        raise NotImplementedError

    def class_names(self) -> list[str]:
        raise NotImplementedError

    def geometry(self, size: int) -> Geometry:
        if self.geometry_mode == "identity" and size != self.native_size:
            return Geometry(size, "resize")
        return Geometry(size, self.geometry_mode)
