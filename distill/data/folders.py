"""Data sets stored as class folders (the torchvision ImageFolder layout): ``imagefolder``, ``imagenet``.

``data_dir`` itself is the root: ``data_dir/train/<class>/<image>`` plus ``data_dir/test/...``
and/or ``data_dir/val/...``. Class indices follow the sorted folder names of ``train/``; the
other splits use the same mapping (a class may have no folder there, but they may not add one).
Folders whose names start with a dot (``.ipynb_checkpoints``...) are not classes.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.data.base import Source, SourceConfig
from distill.data.splits import SplitData
from distill.errors import ConfigError, DataError, DataNotFoundError

#: how image files are checked before any work: ``header`` opens each (PIL reads its header: catches files that
#: are not images, empty or cut short in their header), ``decode`` decodes every pixel (also catches a truncated
#: body; the device-resident path decodes every image anyway), ``off`` checks nothing
CHECK_MODES = ("header", "decode", "off")
#: what happens to files that fail the check: one error listing them, or training without them (a warning says which)
BAD_IMAGE_ACTIONS = ("error", "skip")
#: how many unreadable files one message names (it also says how many there are in all)
LISTED = 10


def class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


def has_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image file (stops at the first one: cheap even for ImageNet's folders)."""
    with os.scandir(folder) as entries:
        return any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries)


def first_image(directory: Path, classes: list[str]) -> Path | None:
    for name in classes:
        for file in sorted(os.listdir(directory / name)):
            if file.lower().endswith(IMG_EXTENSIONS):
                return directory / name / file
    return None


def image_problem(path: str, decode: bool) -> str | None:
    """Why PIL cannot read the image file ``path`` (its header only, or every pixel with ``decode``), or None."""
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for the ways a file can be broken
        return str(error).replace(str(path), "").strip(" '") or type(error).__name__
    return None


def unreadable_images(paths: list[str], decode: bool) -> list[tuple[str, str]]:
    """``(path, reason)`` of each file of ``paths`` that PIL cannot read, in the order given.

    Threads, since opening files waits on the disk (and PIL decodes without the GIL): about 60 µs a file for
    the header and 120 µs to decode a 32-px JPEG on a 2-core machine, so seconds for CIFAR-size folders.
    """
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        reasons = pool.map(lambda path: image_problem(path, decode), paths, chunksize=256)
        return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


class _FixedClassFolder(ImageFolder):
    """An ImageFolder that uses a given class list (that of ``train/``) instead of its own folders."""

    def __init__(self, root: Path, classes: list[str], allow_empty: bool) -> None:
        self._fixed_classes = classes
        super().__init__(str(root), allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: index for index, name in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return super().__getitem__(index)
        except OSError as error:  # one the header check could not see (a body cut short); decode checks them all
            raise DataError(f"cannot read {self.samples[index][0]} ({error}); set data.check_images: decode to find "
                            "every such file before training, and replace them or set data.bad_images: skip") from error

    def leave_out(self, paths: set[str]) -> None:
        """Drops the files ``paths`` from the samples (``bad_images: skip``)."""
        self.samples = [sample for sample in self.samples if sample[0] not in paths]
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]


class ImageFolderSource(Source):
    """Any ``train/`` + ``test/`` and/or ``val/`` tree of class folders.

    With both ``val/`` and ``test/``, they are the validation and test sets; with one of them,
    it is the test set and validation is carved out of ``train/`` (``val_fraction``, default 0.1).
    The native size is the shorter side of the first training image (capped at 224 for
    photographs of arbitrary size). Images of at most 64 px are treated like CIFAR (default
    augmentation ``cifar``, evaluation = resize + centre crop to ``image_size``, a no-op at the
    native size); larger ones like ImageNet (``inception``, resize to 8/7 then centre crop).
    """

    name = "imagefolder"
    low_res_limit = 64
    layout_hint = "train/<class>/<image> and test/<class>/<image> (or val/)"

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.train_dir = self.root / "train"
        self.test_dir, self.val_dir = self._eval_dirs()
        self._classes = class_folders(self.train_dir)
        if not self._classes:
            raise DataNotFoundError(
                f"{self.name}: {self.train_dir.absolute()} has no class folders; expected {self.layout_hint}."
            )
        empty = [name for name in self._classes if not has_image(self.train_dir / name)]
        if empty:  # torchvision would refuse it only when the run has started
            raise self._missing(f"the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} of "
                                f"{self.train_dir.absolute()} hold{'' if len(empty) > 1 else 's'} no image files "
                                f"({', '.join(IMG_EXTENSIONS)}): add images or remove the folder")
        for directory in (self.test_dir, self.val_dir):
            if directory is not None:
                self._check_no_extra_classes(directory)
        self.default_val_fraction = None if self.val_dir is not None else type(self).default_val_fraction
        self._set_size()

    def _missing(self, what: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"{self.name}: {what}; set data_dir to a folder with {self.layout_hint} "
            f"(folder data sets cannot be downloaded)."
        )

    def _eval_dirs(self) -> tuple[Path, Path | None]:
        if not self.train_dir.is_dir():
            raise self._missing(f"{self.train_dir.absolute()} does not exist")
        test, val = self.root / "test", self.root / "val"
        if test.is_dir() and val.is_dir():
            return test, val
        if test.is_dir() or val.is_dir():
            return (test if test.is_dir() else val), None
        raise self._missing(f"neither {test.absolute()} nor {val.absolute()} exists")

    def _set_size(self) -> None:
        path = first_image(self.train_dir, self._classes)
        if path is None:
            raise self._missing(f"no image files ({', '.join(IMG_EXTENSIONS)}) in the class folders of "
                                f"{self.train_dir.absolute()}")
        try:
            with Image.open(path) as image:
                native = min(image.size)
        except OSError as error:  # PIL.UnidentifiedImageError included
            raise self._missing(f"cannot read {path.absolute()} ({error})") from error
        self.native_size = min(native, 224)
        low_res = native <= self.low_res_limit
        self.geometry_mode = "resize" if low_res else "resize_crop"
        self.default_preset = "cifar" if low_res else "inception"

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    def class_names(self) -> list[str]:
        return list(self._classes)

    def _check_no_extra_classes(self, directory: Path) -> None:
        extra = sorted(set(class_folders(directory)) - set(self._classes))
        if extra:
            raise ConfigError(
                f"{self.name}: {directory} has class folders that {self.train_dir} lacks ({', '.join(extra[:5])}); "
                "every class needs training images."
            )

    def _folder(self, directory: Path, allow_empty: bool) -> _FixedClassFolder:
        try:
            return _FixedClassFolder(directory, self._classes, allow_empty=allow_empty)
        except FileNotFoundError as error:  # torchvision: a class folder without images
            raise self._missing(str(error).splitlines()[0].rstrip(".") + f" in {directory}") from error

    def load(self) -> dict[str, SplitData]:
        folders = {"train": self._folder(self.train_dir, allow_empty=False),
                   "test": self._folder(self.test_dir, allow_empty=True)}
        if self.val_dir is not None:
            folders["val"] = self._folder(self.val_dir, allow_empty=True)
        self._check_images(folders)
        splits = {}
        for split, data in folders.items():
            labels = np.asarray(data.targets, dtype=np.int64)
            splits[split] = SplitData(data, np.arange(len(labels)), labels)
        return splits

    def _check_images(self, folders: dict[str, _FixedClassFolder]) -> None:
        """Every file of every split opened (or decoded) before any work; then one error, or a warning and
        the files left out (``bad_images: skip``)."""
        mode = self.config.check_images
        if mode == "off":
            return
        paths = [path for data in folders.values() for path, _ in data.samples]
        bad = unreadable_images(paths, decode=mode == "decode")
        if not bad:
            return
        listed = ", ".join(f"{os.path.relpath(path, self.root)} ({reason})" for path, reason in bad[:LISTED])
        more = f" and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        what = f"{len(bad)} of the {len(paths)} image files in {self.root.absolute()} cannot be read"
        if self.config.bad_images == "error":
            raise DataError(f"{self.name}: {what}: {listed}{more}. Replace or delete them, or set data.bad_images: "
                            "skip to train and evaluate without them.")
        warnings.warn(f"{self.name}: {what} and are left out (bad_images: skip): {listed}{more}", stacklevel=2)
        for data in folders.values():
            data.leave_out({path for path, _ in bad})
        if not folders["train"].samples:
            raise DataError(f"{self.name}: no readable training image is left in {self.train_dir.absolute()}.")


class ImageNetSource(ImageFolderSource):
    """ILSVRC-2012 in class folders: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    The official validation set is the test set (its labels are public, the test set's are not);
    validation is carved out of train, 2% by default, as Beyer et al. (2022) hold out train[98%:].
    The raw ``val/`` download is one flat folder: sort it into class folders first.
    """

    name = "imagenet"
    default_val_fraction = 0.02
    layout_hint = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"

    def _eval_dirs(self) -> tuple[Path, Path | None]:
        val = self.root / "val"
        for directory in (self.train_dir, val):
            if not directory.is_dir():
                raise self._missing(f"{directory.absolute()} does not exist")
        if not class_folders(val):
            raise self._missing(f"{val.absolute()} has no class folders (sort the flat val/ into <wnid>/ folders)")
        return val, None

    def _set_size(self) -> None:
        pass  # photographs of every size: the standard 224 and the ImageNet defaults apply
