"""Data sets read (and optionally downloaded) by torchvision.

``data_dir`` is torchvision's ``root``; each data set lives in the folder torchvision gives it
there (``cifar-10-batches-py``, ``cifar-100-python``, ``flowers-102``, ``oxford-iiit-pet``,
``food-101``, ``SUN397``), so the usual ``data/cifar-100-python`` of other KD code bases works as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torchvision import datasets

from distill.data.base import FIXED_TEST_SEED, Source, SourceConfig
from distill.data.splits import TEST_STREAM, SplitData, split_off
from distill.errors import DataNotFoundError


class TorchvisionSource(Source):
    """A torchvision data set; subclasses say where its files are and how to open a split."""

    folder: str  # the folder torchvision creates under root
    required: tuple[str, ...]  # entries of that folder the cheap existence check looks for
    classes: int
    splits: dict[str, Any]  # our split name -> the argument that opens it
    known_names: tuple[str, ...] = ()  # class names, where we need not open the data to know them

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self._opened: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return self.classes

    def _make(self, which: Any, download: bool) -> Any:
        raise NotImplementedError

    def check(self) -> None:
        base = self.root / self.folder
        for entry in self.required:
            if not (base / entry).exists():
                raise DataNotFoundError(
                    f"{self.name} not found: {(base / entry).absolute()} does not exist; set `download: true` "
                    f"(--data.download true) on a machine with internet access, or copy the {self.name} "
                    f"files into {base.absolute()}."
                )

    def download(self) -> None:
        try:
            self._make(next(iter(self.splits.values())), download=True)
        except (OSError, RuntimeError) as error:  # URLError and HTTPError are OSErrors
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise DataNotFoundError(
                f"downloading {self.name} into {self.root.absolute()} failed ({reason}); check the internet "
                f"connection, or copy the {self.name} files into {(self.root / self.folder).absolute()}."
            ) from error

    def _open(self, split: str) -> Any:
        if split not in self._opened:
            try:
                self._opened[split] = self._make(self.splits[split], download=False)
            except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
                self.check()  # names the missing file if one is missing
                raise DataNotFoundError(
                    f"{self.name} files under {(self.root / self.folder).absolute()} are incomplete or corrupt "
                    f"({error}); delete them and download again."
                ) from error
        return self._opened[split]

    def _split(self, split: str) -> SplitData:
        data = self._open(split)
        labels = np.asarray(data.targets if hasattr(data, "targets") else data._labels, dtype=np.int64)
        return SplitData(data, np.arange(len(labels)), labels)

    def load(self) -> dict[str, SplitData]:
        return {name: self._split(name) for name in self.splits}

    def class_names(self) -> list[str]:
        return list(self.known_names or self._open(next(iter(self.splits))).classes)


class Cifar10(TorchvisionSource):
    """CIFAR-10: 50,000 train (validation carved out, default 10%) and 10,000 test images, 32 px."""

    name = "cifar10"
    folder = "cifar-10-batches-py"
    required = (*(f"data_batch_{k}" for k in range(1, 6)), "test_batch", "batches.meta")
    classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    native_size = 32
    geometry_mode = "identity"
    default_preset = "cifar"
    splits = {"train": True, "test": False}

    known_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.CIFAR10(str(self.root), train=which, download=download)


class Cifar100(Cifar10):
    """CIFAR-100 (fine labels): 50,000 train (validation carved out) and 10,000 test images, 32 px."""

    name = "cifar100"
    folder = "cifar-100-python"
    required = ("train", "test", "meta")
    classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    known_names = ()  # read from the meta file

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.CIFAR100(str(self.root), train=which, download=download)


class Flowers102(TorchvisionSource):
    """Oxford Flowers-102 with its official train / val / test split (1,020 / 1,020 / 6,149)."""

    name = "flowers102"
    folder = "flowers-102"
    required = ("jpg", "imagelabels.mat", "setid.mat")
    classes = 102
    default_val_fraction = None
    splits = {"train": "train", "val": "val", "test": "test"}

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.Flowers102(str(self.root), split=which, download=download)


class OxfordPets(TorchvisionSource):
    """Oxford-IIIT Pet, 37 breeds: official trainval (validation carved out, 10%) and test."""

    name = "oxford_pets"
    folder = "oxford-iiit-pet"
    required = ("images", "annotations")
    classes = 37
    splits = {"train": "trainval", "test": "test"}

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.OxfordIIITPet(str(self.root), split=which, download=download)


class Food101(TorchvisionSource):
    """Food-101: official train (validation carved out, 10%) and test (25,250 images)."""

    name = "food101"
    folder = "food-101"
    required = ("images", "meta")
    classes = 101
    splits = {"train": "train", "test": "test"}

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.Food101(str(self.root), split=which, download=download)


class Sun397(TorchvisionSource):
    """SUN397 scenes. torchvision has no split, so this one is ours: 70 / 10 / 20 % train / val / test.

    The sizes are those of the TFDS/VTAB ``sun397`` split but not its images. Images are ordered
    by path first (torchvision lists them in file-system order). The test 20% is stratified and
    drawn with a fixed seed, the same for every ``split_seed``; validation is ``val_fraction``
    (default 0.125, i.e. 10% of all) of the rest, drawn with ``split_seed``.
    """

    name = "sun397"
    folder = "SUN397"
    required = ("ClassName.txt",)
    classes = 397
    default_val_fraction = 0.125
    test_fraction = 0.2
    splits = {"all": None}

    def _make(self, which: Any, download: bool) -> Any:
        return datasets.SUN397(str(self.root), download=download)

    def load(self) -> dict[str, SplitData]:
        data = self._open("all")
        by_path = np.argsort(np.array([str(path) for path in data._image_files]), kind="stable")
        everything = SplitData(data, by_path, np.asarray(data._labels, dtype=np.int64)[by_path])
        pool, test = split_off(everything.labels, round(self.test_fraction * len(by_path)),
                               FIXED_TEST_SEED, TEST_STREAM)
        return {"train": everything.take(pool), "test": everything.take(test)}
