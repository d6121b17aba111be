"""Deterministic stratified splits, and the dataset wrapper that gives every sample its index.

Every split is a list of *source positions* (positions in the data set as the source hands it out)
in a fixed order (ascending, unless the source defines another, as ``sun397`` does), so a sample's
position in its split, the ``index`` in each batch, depends only on which samples the split
holds, never on the order in which they were drawn.

Random draws use their own NumPy generator seeded from ``(seed, stream)`` rather than the global
RNG: the same seed gives the same split in any process, whatever ran before, and the streams for
different purposes (test, validation, subset) are independent even under the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

# Streams of the split generator; the numbers are part of the splits' definition, do not change.
TEST_STREAM, VAL_STREAM, SUBSET_STREAM = 0, 1, 2


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Share ``total`` out over classes in proportion to ``counts`` (largest remainder method).

    Exact integer arithmetic, so e.g. 500 of ten classes of 400 gives exactly 50 each; leftover
    units go to the classes with the largest remainders, ties to the lower class.
    """
    counts = np.asarray(counts, dtype=np.int64)
    size = int(counts.sum())
    share, remainder = np.divmod(counts * total, size)
    leftover = total - int(share.sum())
    share[np.argsort(-remainder, kind="stable")[:leftover]] += 1
    return share


def stratified_pick(labels: np.ndarray, total: int, seed: int, stream: int) -> np.ndarray:
    """Positions (ascending) of ``total`` items drawn per class in proportion to the class sizes."""
    labels = np.asarray(labels)
    if total >= len(labels):
        return np.arange(len(labels))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keys = np.random.default_rng((seed, stream)).random(len(labels))
    order = np.lexsort((keys, inverse))  # by class, then random key: each class's draw order
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(labels)) - starts[inverse[order]]
    return np.sort(order[rank < allocate(counts, total)[inverse[order]]])


def split_off(labels: np.ndarray, count: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into ``(rest, picked)``, ``picked`` stratified, ``count`` long."""
    picked = stratified_pick(labels, count, seed, stream)
    rest = np.setdiff1d(np.arange(len(labels)), picked, assume_unique=True)
    return rest, picked


@dataclass
class SplitData:
    """One split before transforms: a source data set and the positions in it that form the split."""

    base: Any  # a map-style data set whose items are ``(image, label)``
    indices: np.ndarray  # source positions, in a fixed order
    labels: np.ndarray  # the label of each of them

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, positions: np.ndarray) -> SplitData:
        """The sub-split made of the given positions of this split."""
        return SplitData(self.base, self.indices[positions], self.labels[positions])


class IndexedSplit(Dataset):
    """A transformed split whose items are ``(image, label, index)``, ``index`` its position in the split.

    Images are uint8 tensors here; the data module's loaders normalise them a batch at a time.

    The index is the sample's identity across epochs, processes and workers (the sampler only
    chooses which indices to ask for), which is what per-sample caches such as stored teacher
    outputs need.
    """

    def __init__(self, data: SplitData, transform: Callable[[Any], Any]) -> None:
        self.data = data
        self.transform = transform

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels

    @property
    def source_indices(self) -> np.ndarray:
        return self.data.indices

    def with_transform(self, transform: Callable[[Any], Any]) -> IndexedSplit:
        """The same samples under another transform (e.g. the training split without augmentation)."""
        return IndexedSplit(self.data, transform)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        """``key``: a position, or ``(position, draw seed)`` from :class:`EpochShuffle`, which seeds the random draws
        of this image's transform (see :func:`sample_seed`)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.data.base[int(self.data.indices[index])]
        if seed is None:
            return self.transform(image), int(label), int(index)
        if not hasattr(self, "_generator"):  # one per process: each DataLoader worker has its own copy
            self._generator = torch.Generator()
        return self.transform(image, self._generator.manual_seed(seed)), int(label), int(index)


_MASK64 = 2**64 - 1


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: every input bit changes about half the output bits."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training image's augmentation in one epoch: a function of the run's seed, the epoch and the
    sample's index only, mixed so that neighbouring epochs and indices get unrelated streams (torch's CPU generator
    keeps 32 bits of a seed, which all depend on every input)."""
    mixed = _mix64((seed & _MASK64) ^ _mix64((epoch + 1) * 0x9E3779B97F4A7C15 & _MASK64 ^ _mix64(index + 1)))
    return (mixed ^ (mixed >> 32)) & 0xFFFFFFFF


class EpochShuffle(DistributedSampler):
    """A random order per epoch that depends only on ``(seed, epoch)``, sharded over DDP processes.

    torch's RandomSampler draws each epoch's order from the global RNG, whose state after a resume
    differs from an uninterrupted run's; this one makes a resumed run see exactly the batches it
    would have seen. Lightning calls :meth:`set_epoch` every epoch. Under DDP every process draws the
    same permutation of the whole split and process ``rank`` takes every ``num_replicas``-th sample
    of it (padded like torch's DistributedSampler), so the global batch of step ``b`` is
    positions ``[b·B·W, (b+1)·B·W)`` of the permutation: the same images as one process with batch
    ``B·W``. Being a DistributedSampler, Lightning does not replace it.

    :meth:`skip_next` makes the next pass start later in the epoch (a run resumed mid-epoch).
    ``draw_seeds``: yield ``(index, seed)`` pairs, the seed of that image's augmentation in this epoch
    (:func:`sample_seed`), which :class:`IndexedSplit` hands to its transform.
    """

    def __init__(self, data_source: Any, seed: int, num_replicas: int = 1, rank: int = 0,
                 draw_seeds: bool = False) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.data_source = data_source
        self.draw_seeds = draw_seeds
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """The next pass over this process's share starts after its first ``samples`` samples."""
        self._skip = samples

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**62)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        while len(order) < self.total_size:  # every process gets the same number of samples
            order += order[: self.total_size - len(order)]
        skip, self._skip = self._skip, 0
        share = order[self.rank:self.total_size:self.num_replicas][skip:]
        if self.draw_seeds:
            yield from ((index, sample_seed(self.seed, self.epoch, index)) for index in share)
        else:
            yield from share
